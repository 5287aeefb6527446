"""The defaults of a generation, in one table: `generate`, the diffusers-style `Pipeline.__call__`, the request
that the command line and the web API build, and the training previews all read them here."""

SAMPLER = "dpmpp_2m"  # with 20 steps, the quality of 50 DDIM steps on the bundled models (BENCHMARKS.md)
STEPS = 20
CFG = 3.0  # classifier-free guidance scale (1: the conditional model alone)
CLASSIFIER_SCALE = 1.0  # classifier guidance scale (1: Bayes' rule with an exact classifier)
CFG_UNTIL = 1.0  # classifier-free guidance over this first fraction of the steps (then the conditional model alone)
CACHE = 1  # DeepCache: recompute the UNet's deep features every this many steps (1: every step, exact)
CACHE_DEPTH = 1  # DeepCache: the skip connections above which the UNet's blocks run every step
UG_ETA = 1.0  # Upsample Guidance acts while t >= (1 - eta) T
UG_AUTO = "auto"  # the Upsample Guidance weight that picks itself (guidance.upsample_guidance_weight)
UG_AUTO_W = 0.5  # what it picks: the best weight of the sweep on 1,000 digits per weight (docs/upsample_guidance.md)
UG_W = UG_AUTO  # the Upsample Guidance weight suggested to users (the hint, the web UI's default)
UG_MAX = 10.0  # the largest Upsample Guidance weight accepted (the article's useful range is about 0-1)
STRENGTH = {"img2img": 0.6, "inpaint": 1.0, "outpaint": 1.0}  # how far down the schedule an input is noised, by task
N = 8  # images per label / prompt
SEED = 0
GRID_SCALE = 2  # pixel magnification in written grids
REFINER_START = 0.8  # the fraction of the steps after which a refiner takes over
DECODE_MEMORY = 2 * 2**30  # bytes of activations a latent decode may take; larger ones are decoded in tiles
DTYPE = "auto"  # the network's compute precision: bf16 where the device computes it natively, else fp32
DEVICE = "cpu"
PROMPT_SYNTAX = "a1111"  # A1111 attention weights and prompts beyond 77 tokens (prompts.py); "plain" turns them off
MASK_BLUR = {"inpaint": 0, "outpaint": 4}  # pixels of soft seam where a regenerated area meets the kept image
