"""Random SanaPipelines built offline, for tests and benchmarks without a download: the Sana-Sprint
teacher's features (QK-norm, timestep_scale 0.001, flow shift 3) at reduced or the paper's shapes
(SIZES), each cached once per diffusers / transformers version. Its folders load as any local Sana
folder does (sana.load_sana).
"""

from collections.abc import Iterator
from contextlib import contextmanager
from importlib.metadata import version
from pathlib import Path

import torch

from checkpoint import atomic_path

TINY_MAX_SEQUENCE_LENGTH = 16  # --tiny: keeps the tiny Gemma's text encoding short

# Random SanaPipeline shapes built offline. "tiny": the smallest that exercises every code path
# (tests). "small": the paper's setting at reduced width and depth (bench/cost.py): the real DC-AE
# f32c32 topology (6 stages, 3 ResBlock + 3 EfficientViT stages, 32 latent channels) at 1/8 width,
# a Gemma-2-like text encoder with 4 layers of width 256 (Gemma-2 2B: 26 × 2304), a Sana
# transformer with 4 layers of width 256 (Sana 0.6B: 28 × 1152).
_DCAE_F32C32 = dict(
    encoder_block_types=("ResBlock",) * 3 + ("EfficientViTBlock",) * 3,
    decoder_block_types=("ResBlock",) * 3 + ("EfficientViTBlock",) * 3,
    encoder_layers_per_block=(2, 2, 2, 3, 3, 3),
    decoder_layers_per_block=(3, 3, 3, 3, 3, 3),
    encoder_qkv_multiscales=((), (), (), (5,), (5,), (5,)),
    decoder_qkv_multiscales=((), (), (), (5,), (5,), (5,)),
    decoder_norm_types=("batch_norm",) * 3 + ("rms_norm",) * 3,
    decoder_act_fns=("relu",) * 3 + ("silu",) * 3,
)
SIZES = {
    "tiny": dict(
        text=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=16,
        ),
        transformer=dict(
            in_channels=4,
            out_channels=4,
            num_layers=2,
            num_attention_heads=2,
            attention_head_dim=16,
            num_cross_attention_heads=2,
            cross_attention_head_dim=16,
            cross_attention_dim=32,
            caption_channels=32,
            sample_size=8,
        ),
        vae=dict(
            latent_channels=4,
            attention_head_dim=4,
            encoder_block_types=("ResBlock",) * 2 + ("EfficientViTBlock",) * 2,
            decoder_block_types=("ResBlock",) * 2 + ("EfficientViTBlock",) * 2,
            encoder_block_out_channels=(8, 8, 16, 16),
            decoder_block_out_channels=(8, 8, 16, 16),
            encoder_qkv_multiscales=((), (), (5,), (5,)),
            decoder_qkv_multiscales=((), (), (5,), (5,)),
            encoder_layers_per_block=(1, 1, 1, 1),
            decoder_layers_per_block=(1, 1, 1, 1),
        ),
    ),
    "small": dict(
        text=dict(
            hidden_size=256,
            intermediate_size=1024,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=64,
        ),
        transformer=dict(
            in_channels=32,
            out_channels=32,
            num_layers=4,
            num_attention_heads=8,
            attention_head_dim=32,
            num_cross_attention_heads=8,
            cross_attention_head_dim=32,
            cross_attention_dim=256,
            caption_channels=256,
            sample_size=16,
        ),
        vae=dict(
            latent_channels=32,
            attention_head_dim=16,
            encoder_block_out_channels=(16, 32, 64, 64, 128, 128),
            decoder_block_out_channels=(16, 32, 64, 64, 128, 128),
            **_DCAE_F32C32,
        ),
    ),
    # The paper's shapes (random weights, for bench/cost.py --config paper-sana): the Sana-Sprint
    # 0.6B 1024 px teacher (Sana-0.6B: 28 layers × 1152, 36 self-attention heads of 32, 16 cross-
    # attention heads of 72, caption 2304; 591.9 M parameters), Gemma-2-2B (transformers'
    # Gemma2Config defaults are gemma-2-2b's: 26 × 2304, vocabulary 256000; 2.61 B) and the DC-AE
    # f32c32 of Sana 1.0 (AutoencoderDC's default widths; 312 M).
    "paper": dict(
        text=dict(vocab_size=256000),
        transformer=dict(
            in_channels=32,
            out_channels=32,
            num_layers=28,
            num_attention_heads=36,
            attention_head_dim=32,
            num_cross_attention_heads=16,
            cross_attention_head_dim=72,
            cross_attention_dim=1152,
            caption_channels=2304,
            sample_size=32,
        ),
        vae=dict(latent_channels=32, attention_head_dim=32, **_DCAE_F32C32),
    ),
}
# Sana-Sprint 1.6B's shapes, for bench/cost_shard.py (counted on the meta device): its teacher
# Sana-1.6B 1024 px (Efficient-Large-Model/Sana_1600M_1024px_MultiLing_diffusers, transformer/
# config.json: 20 layers × 2240, 70 self-attention heads of 32, 20 cross-attention heads of 112,
# caption 2304, mlp_ratio 2.5), the same Gemma-2-2B and DC-AE as "paper".
SIZES["paper-1.6b"] = dict(
    text=SIZES["paper"]["text"],
    transformer=SIZES["paper"]["transformer"]  # channels, caption and sample size as the 0.6B's
    | dict(num_layers=20, num_attention_heads=70, attention_head_dim=32, cross_attention_dim=2240)
    | dict(num_cross_attention_heads=20, cross_attention_head_dim=112),
    vae=SIZES["paper"]["vae"],
)
# Saved dtypes: the released Sana-Sprint teacher and Gemma-2-2B are bf16; the DC-AE stays fp32.
DTYPES = {
    size: dict(text=torch.bfloat16, transformer=torch.bfloat16) for size in ("paper", "paper-1.6b")
}


@contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Modules built inside are created in dtype: a 2.6 B Gemma never exists in fp32 (10.5 GB)."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(before)


def build_pipeline(out_dir: str | Path, seed: int = 0, size: str = "tiny") -> Path:
    """Offline stand-in for the Sana-Sprint teacher: a seeded random SanaPipeline with its features
    and the shapes SIZES[size], saved to out_dir (no download)."""
    from diffusers import SanaPipeline

    SanaPipeline(**build_modules(seed, size)).save_pretrained(out_dir)
    return Path(out_dir)


def build_modules(seed: int, size: str) -> dict:
    """build_pipeline's SanaPipeline components, each created in its DTYPES dtype (on the meta
    device under `with torch.device("meta")`: shapes without memory)."""
    from diffusers import AutoencoderDC, FlowMatchEulerDiscreteScheduler, SanaTransformer2DModel
    from transformers import Gemma2Config, Gemma2Model, GemmaTokenizer

    # Byte-fallback vocabulary: specials, the 256 bytes, a few characters; no merges, no download.
    vocab = {tok: i for i, tok in enumerate(["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"])}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for ch in "▁abcdefghijklmnopqrstuvwxyz0123456789":
        vocab[ch] = len(vocab)
    tokenizer = GemmaTokenizer(vocab=vocab, merges=[], add_bos_token=True)
    shape, dtypes = SIZES[size], DTYPES.get(size, {})
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        # the paper's Gemma-2-2B keeps its vocabulary of 256000 beside this byte tokenizer
        text = dict(vocab_size=len(tokenizer), max_position_embeddings=4096) | shape["text"]
        with default_dtype(dtypes.get("text", torch.float32)):
            text_encoder = Gemma2Model(Gemma2Config(attn_implementation="eager", **text))
        # Sana-Sprint teacher: QK-norm, and timestep_scale 0.001 so that SanaPipeline feeds s
        # (diffusers PR #11150).
        with default_dtype(dtypes.get("transformer", torch.float32)):
            transformer = SanaTransformer2DModel(
                patch_size=1,
                qk_norm="rms_norm_across_heads",
                timestep_scale=0.001,
                **shape["transformer"],
            )
        vae = AutoencoderDC(
            in_channels=3,
            downsample_block_type="conv",
            upsample_block_type="interpolate",
            scaling_factor=0.41407,
            **shape["vae"],
        )
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)  # Sana's flow shift at 1024 px
    modules = dict(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer)
    return modules | dict(scheduler=scheduler)


def cached_folder(cache_dir: str | Path, size: str = "tiny") -> Path:
    """build_pipeline (seed 0, `size`) once per diffusers/transformers version under cache_dir.

    Shared, not per process: under torchrun transformers' save_pretrained writes on rank 0 only,
    and train.py lets rank 0 build first. Built under a temporary name, then renamed into place;
    a folder another process renamed into place first is kept.
    """
    final = Path(cache_dir) / f"sana-{size}-{version('diffusers')}-{version('transformers')}"
    if not (final / "model_index.json").is_file():
        with atomic_path(final, replace=False) as tmp:
            build_pipeline(tmp, size=size)
    return final
