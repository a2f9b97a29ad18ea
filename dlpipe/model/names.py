"""What the registry and the tracking runs call things: the model aliases and the artifacts every stage
finds by name. Defined once, imported without loading anything else."""

CANDIDATE = "candidate"  # the newest trained version: what infer scores with by default
PRODUCTION = "production"  # the version that passed the promotion gate
INT8_ALIAS = "candidate-int8"  # the candidate's dynamically quantized variant, when it passed its gate
# infer.variant: the candidate itself, and its compressed variants
VARIANTS = ("fp32", "int8", "onnx", "prune", "prune-onnx", "distill", "distill-onnx")
STATS_ARTIFACT = "preprocessing/stats.json"  # in the training run: the statistics its model was trained with
BASELINE_ALIAS = "baseline"  # the gradient-boosted tree baseline trained by evaluate (dlpipe.model.baseline)


def variant_alias(variant: str) -> str:
    """The alias of the candidate's variant: candidate itself for fp32, else candidate-<variant>."""
    return CANDIDATE if variant == "fp32" else f"{CANDIDATE}-{variant}"
