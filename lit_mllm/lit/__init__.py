"""One LightningModule per architecture family, on a shared base."""

from lit_mllm.lit.base import NoSupervisedTokens, VLMModule, lm_loss
from lit_mllm.lit.prefix import PrefixFusionVLM

__all__ = ["NoSupervisedTokens", "VLMModule", "lm_loss", "PrefixFusionVLM"]
