"""One LightningModule per architecture family, on a shared base (adding one: docs/families.md), and the pretraining
modules that are not VLMs: BLIP-2 stage 1 (the Q-Former) and CLIP pretraining of the towers a VLM can start from."""

from lit_mllm.lit.base import LanguageInputs, NoSupervisedTokens, VLMModule, lm_loss
from lit_mllm.lit.clip_pretraining import CLIPPretraining
from lit_mllm.lit.cogvlm import CogVLM
from lit_mllm.lit.flamingo import FlamingoVLM
from lit_mllm.lit.owl3 import MPLUGOwl3VLM
from lit_mllm.lit.prefix import PrefixFusionVLM
from lit_mllm.lit.qformer_pretraining import QFormerPretraining

__all__ = [
    "LanguageInputs",
    "NoSupervisedTokens",
    "VLMModule",
    "lm_loss",
    "PrefixFusionVLM",
    "CogVLM",
    "FlamingoVLM",
    "MPLUGOwl3VLM",
    "QFormerPretraining",
    "CLIPPretraining",
]
