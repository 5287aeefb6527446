"""Textual-inversion embeddings on a pipeline's CLIP text encoders: a token in a prompt (or negative prompt) reads as
the file's vectors (SPEC's text encoder with rows added to its token table; A1111's and diffusers' files)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from ..interop.embeddings import EmbeddingError, read_embedding
from .pipeline import Pipeline


class Embeddings:
    """Embedding files, each under its token (the one given, else the one the file names, else the file's name,
    as A1111 does), on `pipe` until `remove` (or the end of a with block). Every file is read and checked first:
    an EmbeddingError leaves the pipeline unchanged."""

    def __init__(self, pipe: Pipeline, files: Sequence[tuple[str | Path, str | None]]):
        encoders = pipe.clip_encoders
        new: dict[str, dict] = {name: {} for name in encoders}
        for path, token in files:
            e = read_embedding(path)
            token = token or e.token or Path(path).stem
            if set(e.vectors) != set(encoders):
                raise EmbeddingError(f"{path}: an embedding for {' + '.join(sorted(e.vectors))}, this model's CLIP text "
                                     f"encoders are: {' + '.join(encoders) or 'none'}"
                                     + (" (an SD 1.x / 2.x embedding on SDXL?)" if len(encoders) > len(e.vectors)
                                        else ""))
            for name, v in e.vectors.items():
                if token in new[name] or token in encoders[name].embeddings:
                    raise EmbeddingError(f"{path}: a second embedding named {token!r}")
                new[name][token] = v
        self.pipe, self.saved = pipe, []
        try:
            for name, enc in encoders.items():
                old = enc.embeddings
                enc.set_embeddings({**old, **new[name]})
                self.saved.append((enc, old))
        except ValueError as e:
            self.remove()
            raise EmbeddingError(f"{', '.join(str(p) for p, _ in files)}: {e} ({name})") from e
        if files:
            pipe.conditioner.forget_encodings()

    def remove(self) -> None:
        """Take the embeddings off (the text encoders' earlier ones back)."""
        for enc, old in self.saved:
            enc.set_embeddings(old)
        if self.saved:
            self.pipe.conditioner.forget_encodings()
        self.saved = []

    def __enter__(self) -> Embeddings:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()
