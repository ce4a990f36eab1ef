"""The three rankers on tiny random configs, plus the shipped MiniLM backbone."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import RobertaConfig

from mmrecall.models.backbone import build_encoder, load_pretrained_encoder, load_tokenizer, tiny_config
from mmrecall.models.image_input import ImageInput, RankerOutput
from mmrecall.models.mcan import MCAN, LayerNorm, MCANConfig
from mmrecall.models.two_tower import TwoTower, TwoTowerConfig, in_batch_loss, in_batch_softmax_loss
from mmrecall.models.visualbert import VisualBERT, VisualBERTConfig

# The original architectures (the defaults are the CPU ones): what these tests were written against.
ORIGINAL_MCAN = dict(hidden=1024, heads=16, ff=4096, layers=12, dropout=0.1, flat_mlp=512, flat_out=2048,
                     feature_norm=False, img_mlp=None, train_word_embeddings=True, token_match=False)
ORIGINAL_VISUALBERT = dict(backbone_layers=None, feature_norm=False, train_word_embeddings=True, pool="cls")
ORIGINAL_TWO_TOWER = dict(hidden=None, layers=4, init_text_from_backbone=False, train_word_embeddings=True,
                          feature_norm=False, loss="bce")


def mcan_config(**kw) -> MCANConfig:
    return MCANConfig(**{**ORIGINAL_MCAN, **kw})


def visualbert_config(**kw) -> VisualBERTConfig:
    return VisualBERTConfig(**{**ORIGINAL_VISUALBERT, **kw})


def two_tower_config(**kw) -> TwoTowerConfig:
    return TwoTowerConfig(**{**ORIGINAL_TWO_TOWER, **kw})


QUERIES = ["a red dress for girls", "shoes", "bluetooth speaker with led light"]
NUM_BOXES = [3, 5, 1]


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


def tiny_roberta_config() -> RobertaConfig:
    return RobertaConfig(
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=37,
        type_vocab_size=1,  # RoBERTa has a single token type
        pad_token_id=1,
        max_position_embeddings=64,
    )


TINY_MCAN = mcan_config(hidden=32, heads=4, ff=64, layers=2, flat_mlp=16, flat_out=24)
MODELS = {
    "mcan": lambda: MCAN(TINY_MCAN, build_encoder(tiny_config())),
    "mcan-token-match": lambda: MCAN(mcan_config(**{**vars(TINY_MCAN), "token_match": True}),
                                     build_encoder(tiny_config())),
    "visualbert": lambda: VisualBERT(visualbert_config(), build_encoder(tiny_config())),
    "visualbert-roberta": lambda: VisualBERT(visualbert_config(), build_encoder(tiny_roberta_config())),
    "visualbert-mean": lambda: VisualBERT(visualbert_config(pool="mean"), build_encoder(tiny_config())),
    "visualbert-pair-frozen": lambda: VisualBERT(visualbert_config(pool="pair", train_word_embeddings=False), build_encoder(tiny_config())),
    "visualbert-nolabel": lambda: VisualBERT(visualbert_config(label_dim=0), build_encoder(tiny_config())),
    "two_tower": lambda: TwoTower(two_tower_config(), build_encoder(tiny_config())),
    "two_tower-softmax": lambda: TwoTower(two_tower_config(loss="softmax", temperature=0.1), build_encoder(tiny_config())),
    "two_tower-frozen": lambda: TwoTower(two_tower_config(train_word_embeddings=False), build_encoder(tiny_config())),
}


def make_batch(tokenizer, text_pad: int = 0, box_pad: int = 0, seed: int = 0) -> dict[str, torch.Tensor]:
    """Real boxes are random; `box_pad` extra padded boxes hold garbage (masked), `text_pad` extra [PAD]s."""
    g = torch.Generator().manual_seed(seed)
    enc = tokenizer(QUERIES, padding=True, return_tensors="pt")
    ids = F.pad(enc["input_ids"], (0, text_pad), value=tokenizer.pad_token_id)
    text_mask = F.pad(enc["attention_mask"], (0, text_pad), value=0)
    B, N = len(QUERIES), max(NUM_BOXES)
    img_mask = torch.arange(N)[None, :] < torch.tensor(NUM_BOXES)[:, None]  # (B, N)
    feat = torch.rand(B, N, 2048, generator=g) * img_mask[..., None]
    box = torch.rand(B, N, 6, generator=g) * img_mask[..., None]
    label = torch.randint(0, 33, (B, N), generator=g) * img_mask
    if box_pad:
        feat = torch.cat([feat, torch.randn(B, box_pad, 2048, generator=g)], 1)
        box = torch.cat([box, torch.rand(B, box_pad, 6, generator=g)], 1)
        label = torch.cat([label, torch.randint(0, 33, (B, box_pad), generator=g)], 1)
        img_mask = F.pad(img_mask, (0, box_pad), value=False)
    return {
        "input_ids": ids, "attention_mask": text_mask,
        "img_feat": feat, "img_box": box, "img_label": label, "img_mask": img_mask,
    }


def build(name: str):
    torch.manual_seed(0)
    return MODELS[name]().eval()


@pytest.mark.parametrize("name", MODELS)
def test_output_shapes(name, tokenizer):
    model = build(name)
    out = model(make_batch(tokenizer))
    assert isinstance(out, RankerOutput)
    assert out.logits.shape == (len(QUERIES),)
    assert out.fused.shape == (len(QUERIES), model.fused_dim)
    assert torch.isfinite(out.logits).all() and torch.isfinite(out.fused).all()


@pytest.mark.parametrize("name", MODELS)
def test_padding_invariance(name, tokenizer):
    model = build(name)
    with torch.no_grad():
        ref = model(make_batch(tokenizer))
        padded_batch = make_batch(tokenizer, text_pad=4, box_pad=6)
        padded = model(padded_batch)
        torch.testing.assert_close(padded.logits, ref.logits, atol=1e-5, rtol=0)
        torch.testing.assert_close(padded.fused, ref.fused, atol=1e-5, rtol=0)
        # The garbage in the padded boxes does reach the model once the mask lets it through.
        padded_batch["img_mask"] = torch.ones_like(padded_batch["img_mask"])
        assert not torch.allclose(model(padded_batch).logits, ref.logits, atol=1e-4)


@pytest.mark.parametrize("name", ["mcan", "mcan-token-match", "two_tower", "two_tower-softmax"])
def test_scoring_encodes_each_query_once(name, tokenizer):
    """In eval mode rows that share a query share one text encoding, and score as if encoded one by one."""
    model = build(name)
    batch = make_batch(tokenizer)
    B = len(QUERIES)
    repeated = {k: torch.cat([v, v.flip(0), v]) for k, v in batch.items()}  # every query 3 times, 3B rows
    repeated["img_feat"] = repeated["img_feat"] + torch.rand_like(repeated["img_feat"]) * repeated["img_mask"][..., None]
    text_module = model.embeddings if name.startswith("mcan") else model.text_tower.embeddings
    seen = []
    hook = text_module.register_forward_hook(lambda mod, args, out: seen.append(len(out)))  # rows embedded
    with torch.no_grad():
        together = model(repeated)
        hook.remove()
        alone = torch.cat([model({k: v[i : i + 1] for k, v in repeated.items()}).logits for i in range(3 * B)])
    assert seen == [B]  # the text side ran once, on the B distinct queries
    torch.testing.assert_close(together.logits, alone, atol=1e-5, rtol=0)
    model.train()  # training encodes every row (its batches hold distinct queries; its numbers stay as they were)
    seen.clear()
    hook = text_module.register_forward_hook(lambda mod, args, out: seen.append(len(out)))
    model(repeated)
    hook.remove()
    assert seen == [3 * B]


def test_token_match_counts_the_worst_matched_token(tokenizer):
    """The token score is a soft minimum over the real tokens: below each token's score, near the lowest."""
    model = build("mcan-token-match")
    batch = make_batch(tokenizer)
    head, mask = model.token_match, batch["attention_mask"].bool()
    lang, img = torch.randn(3, mask.shape[1], 32), torch.randn(3, max(NUM_BOXES), 32)
    with torch.no_grad():
        v = head.att(lang, img, img, batch["img_mask"])
        s = head.score(torch.cat([lang, v, lang * v], dim=-1)).squeeze(-1)  # (B, T)
        soft_min = head(lang, img, mask, batch["img_mask"])
    lowest = s.masked_fill(~mask, float("inf")).min(1).values
    assert (soft_min <= lowest + 1e-6).all()
    assert (soft_min >= lowest - torch.log(mask.sum(1).float()) - 1e-6).all()


def test_checkpoint_from_before_token_match_loads(tmp_path, tokenizer):
    """A member saved before `token_match` and `train.box_select` existed loads as what it was trained as."""
    from mmrecall.ranking import members

    cfg = MCANConfig(**{**vars(TINY_MCAN), "token_match": False, "pretrained": False})
    torch.manual_seed(0)
    model = MCAN.from_config(cfg).eval()
    path = tmp_path / "model.pt"
    members.save(path, "mcan", cfg, model, {"train": {}})
    blob = torch.load(path, weights_only=False)
    del blob["config"]["token_match"]
    torch.save(blob, path)
    loaded = members.load(path)
    assert loaded.model.token_match is None and loaded.box_select == "first"
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(make_batch(tokenizer)).logits, model(make_batch(tokenizer)).logits)


@pytest.mark.parametrize("name", MODELS)
def test_score_depends_on_text_and_image(name, tokenizer):
    model = build(name)
    batch = make_batch(tokenizer)
    with torch.no_grad():
        ref = model(batch).logits
        other_image = dict(batch, img_feat=batch["img_feat"] * 2)
        other_text = dict(
            batch, input_ids=batch["input_ids"].roll(1, 0), attention_mask=batch["attention_mask"].roll(1, 0)
        )
        # (a tiny random VisualBERT's [CLS] moves by ~1e-5 only: compare tighter than float noise, not loosely)
        assert not torch.allclose(model(other_image).logits, ref, atol=1e-6, rtol=0)
        assert not torch.allclose(model(other_text).logits, ref, atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", MODELS)
def test_every_parameter_gets_a_gradient(name, tokenizer):
    model = build(name).train()
    model(make_batch(tokenizer)).logits.sum().backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing
    # only the word embeddings can be frozen, and only when the config says so
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert frozen == ([] if model.cfg.train_word_embeddings else [n for n, _ in model.named_parameters() if n.endswith("word_embeddings.weight")])
    assert len(frozen) <= 1


def test_image_input_layout():
    torch.manual_seed(0)
    layer = ImageInput(label_dim=32, num_labels=33)
    feat, box, label = torch.randn(2, 4, 2048), torch.rand(2, 4, 6), torch.randint(0, 33, (2, 4))
    out = layer(feat, box, label)
    assert out.shape == (2, 4, 2086) == (2, 4, layer.out_dim)
    torch.testing.assert_close(out[..., :2048], feat)
    torch.testing.assert_close(out[..., 2048:2054], box)
    torch.testing.assert_close(out[..., 2054:], layer.label_embedding.weight[label])


def test_image_input_without_labels_has_no_zero_width_embedding():
    """label_dim 0 (the faithful VisualBERT): the 2048 + 6 row, and no (33, 0) embedding whose backward
    crashed on a CUDA device."""
    layer = ImageInput(label_dim=0)
    feat, box, label = torch.randn(2, 4, 2048, requires_grad=True), torch.rand(2, 4, 6), torch.randint(0, 33, (2, 4))
    out = layer(feat, box, label)
    assert out.shape == (2, 4, 2054) == (2, 4, layer.out_dim)
    assert layer.label_embedding is None and not list(layer.parameters())
    out.sum().backward()
    assert feat.grad is not None


def test_mcan_layernorm_matches_formula():
    torch.manual_seed(0)
    ln = LayerNorm(8)
    with torch.no_grad():
        ln.weight.normal_()
        ln.bias.normal_()
    x = torch.randn(3, 5, 8) * 4 + 1
    mean = x.mean(-1, keepdim=True)
    std = ((x - mean) ** 2).sum(-1, keepdim=True).div(8 - 1).sqrt()  # unbiased
    formula = ln.weight * (x - mean) / (std + 1e-6) + ln.bias
    torch.testing.assert_close(ln(x), formula)
    # the fused kernel gives the formula's gradients too (it only moves eps inside the root)
    upstream = torch.randn_like(x)
    grads = torch.autograd.grad((ln(x) * upstream).sum(), [ln.weight, ln.bias])
    expected = torch.autograd.grad((formula * upstream).sum(), [ln.weight, ln.bias])
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want)
    assert ln(torch.zeros(2, 8)).isfinite().all()  # a constant row: the bias, not a division by 0
    # ... which is not torch's LayerNorm (biased variance, eps inside the root).
    assert not torch.allclose(ln(x), F.layer_norm(x, (8,), ln.weight, ln.bias, eps=1e-6), atol=1e-3)



def test_faithful_mcan_size():
    """The 1st place's sizes (H 1024, 16 heads, FF 4096, 12 + 12 blocks, roberta-large embeddings): about 450M."""
    roberta_large = RobertaConfig(
        vocab_size=50265, hidden_size=1024, num_hidden_layers=0, num_attention_heads=16,
        max_position_embeddings=514, type_vocab_size=1, pad_token_id=1,
    )
    with torch.device("meta"):
        model = MCAN(mcan_config(), build_encoder(roberta_large))
    count = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
    H, FF = 1024, 4096
    mha, ffn, ln = 4 * (H * H + H), 2 * H * FF + FF + H, 2 * H
    assert count(model.mca.encoder) == 12 * (mha + ffn + 2 * ln)  # SA: MHA, FFN, 2 LN
    assert count(model.mca.decoder) == 12 * (2 * mha + ffn + 3 * ln)  # SGA: 2 MHA, FFN, 3 LN
    assert model.fused_dim == 8192 and model.classifier[0].out_features == 4096
    assert 440e6 < count(model) < 460e6

def test_in_batch_loss_hand_computed():
    t = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    v = torch.tensor([[1.0, 1.0], [0.0, 1.0]])
    # sim = t @ v.T = [[1, 0], [2, 2]]; diagonal targets 1, off-diagonal 0.
    # BCE-with-logits is softplus(-x) for a target of 1 and softplus(x) for a target of 0.
    softplus = [math.log1p(math.exp(x)) for x in (-1, 0, 2, -2)]
    expected = sum(softplus) / 4
    assert in_batch_loss(t, v).item() == pytest.approx(expected, rel=1e-6)


def test_in_batch_softmax_loss_hand_computed():
    t = torch.tensor([[3.0, 4.0], [0.0, 2.0]])  # unit rows: (0.6, 0.8), (0, 1)
    v = torch.tensor([[1.0, 0.0], [0.0, 5.0]])  # unit rows: (1, 0), (0, 1)
    # cos = [[0.6, 0.8], [0, 1]], / temperature 0.5 = [[1.2, 1.6], [0, 2]]
    def ce(row, target):
        return math.log(sum(math.exp(x) for x in row)) - row[target]
    text_to_image = (ce([1.2, 1.6], 0) + ce([0.0, 2.0], 1)) / 2
    image_to_text = (ce([1.2, 0.0], 0) + ce([1.6, 2.0], 1)) / 2
    expected = (text_to_image + image_to_text) / 2
    assert in_batch_softmax_loss(t, v, 0.5).item() == pytest.approx(expected, rel=1e-6)


def test_swapped_texts_are_extra_negatives_of_every_image():
    t = torch.tensor([[3.0, 4.0], [0.0, 2.0]])  # unit rows: (0.6, 0.8), (0, 1)
    v = torch.tensor([[1.0, 0.0], [0.0, 5.0]])  # unit rows: (1, 0), (0, 1)
    extra = torch.tensor([[2.0, 0.0]])  # unit (1, 0): cos 1 with image 0, 0 with image 1; / 0.5 = 2, 0

    def ce(row, target):
        return math.log(sum(math.exp(x) for x in row)) - row[target]
    text_to_image = (ce([1.2, 1.6], 0) + ce([0.0, 2.0], 1)) / 2  # unchanged
    image_to_text = (ce([1.2, 0.0, 2.0], 0) + ce([1.6, 2.0, 0.0], 1)) / 2
    assert in_batch_softmax_loss(t, v, 0.5, extra_text=extra).item() == pytest.approx((text_to_image + image_to_text) / 2, rel=1e-6)
    # bce (test_in_batch_loss_hand_computed's vectors): the (S, B) extra pairs are negatives in the same mean
    t, v = torch.tensor([[1.0, 0.0], [0.0, 2.0]]), torch.tensor([[1.0, 1.0], [0.0, 1.0]])
    softplus = [math.log1p(math.exp(x)) for x in (-1, 0, 2, -2, 2, 0)]  # sim [[1, 0], [2, 2]], extra @ v.T [[2, 0]]
    assert in_batch_loss(t, v, extra_text=extra).item() == pytest.approx(sum(softplus) / 6, rel=1e-6)


@pytest.mark.parametrize("loss", ["bce", "softmax"])
def test_in_batch_losses_leave_out_rows_of_the_same_query(loss):
    """Rows 0 and 1 share a query: their cross similarities are not negatives, whatever their value."""
    fn = (lambda t, v, q: in_batch_loss(t, v, q)) if loss == "bce" else (lambda t, v, q: in_batch_softmax_loss(t, v, 0.1, q))
    torch.manual_seed(0)
    t, v = torch.randn(3, 4), torch.randn(3, 4)
    query = torch.tensor([7, 7, 9])
    moved = v.clone()
    moved[1] = t[0] * 3 + 0.1 * torch.randn(4)  # image 1 now looks like text 0's best match
    base, after = fn(t, v, query), fn(t, moved, query)
    # Only pairs (0, 1) and (1, 0) are left out; image 1's other pairs (its own positive, query 9) count.
    assert fn(t, v, None).item() != pytest.approx(base.item())
    if loss == "bce":  # mean over the 7 kept pairs
        full = F.binary_cross_entropy_with_logits(t @ v.T, torch.eye(3), reduction="none")
        keep = ~torch.tensor([[False, True, False], [True, False, False], [False, False, False]])
        assert base.item() == pytest.approx(full[keep].mean().item(), rel=1e-6)
    else:
        sim = F.normalize(t, dim=-1) @ F.normalize(v, dim=-1).T / 0.1
        sim[0, 1] = sim[1, 0] = float("-inf")
        target = torch.arange(3)
        expected = (F.cross_entropy(sim, target) + F.cross_entropy(sim.T, target)) / 2
        assert base.item() == pytest.approx(expected.item(), rel=1e-6)
    assert after.item() != pytest.approx(base.item())  # still a real loss of image 1


def test_two_tower_softmax_logits_are_scaled_cosines(tokenizer):
    model = build("two_tower-softmax")
    batch = make_batch(tokenizer)
    with torch.no_grad():
        t, v, out = model.encode_text(batch), model.encode_image(batch), model(batch)
    torch.testing.assert_close(out.logits, F.cosine_similarity(t, v, dim=-1) / 0.1)
    with pytest.raises(ValueError, match="loss"):
        TwoTowerConfig(loss="hinge")


def test_two_tower_logits_are_paired_dot_products(tokenizer):
    model = build("two_tower")
    batch = make_batch(tokenizer)
    with torch.no_grad():
        t, v, out = model.encode_text(batch), model.encode_image(batch), model(batch)
    torch.testing.assert_close(out.logits, (t * v).sum(-1))
    torch.testing.assert_close(out.fused, torch.cat([t, v, t * v], -1))
    assert model.image_encoder is not model.text_tower.encoder


def test_shipped_minilm_loads_offline(tokenizer):
    full = load_pretrained_encoder("minilm")
    short = load_pretrained_encoder("minilm", num_layers=2)
    assert full.config.hidden_size == short.config.hidden_size == 384
    assert len(full.encoder.layer) == 6 and len(short.encoder.layer) == short.config.num_hidden_layers == 2
    full_state = full.state_dict()
    for key, value in short.state_dict().items():
        torch.testing.assert_close(value, full_state[key], msg=key)
    random = load_pretrained_encoder("minilm", num_layers=2, pretrained=False)
    assert not torch.allclose(
        random.embeddings.word_embeddings.weight, short.embeddings.word_embeddings.weight
    )
    # Uncased WordPiece that matches the embedding table.
    assert len(tokenizer) == full.config.vocab_size
    assert tokenizer("Red Dress")["input_ids"] == tokenizer("red dress")["input_ids"]


def test_from_config(tokenizer):
    batch = make_batch(tokenizer)
    torch.manual_seed(0)
    mcan_cfg = mcan_config(hidden=32, heads=4, ff=64, layers=1, flat_mlp=16, flat_out=24, pretrained=False)
    mcan = MCAN.from_config(mcan_cfg)
    assert mcan.lang_proj.in_features == 384
    visualbert = VisualBERT.from_config(visualbert_config(backbone_layers=1, pretrained=False))
    assert visualbert.fused_dim == 384 and len(visualbert.bert.encoder.layer) == 1
    two_tower = TwoTower.from_config(two_tower_config(hidden=32, layers=2, heads=4, ff=37))
    assert two_tower.fused_dim == 96 and len(two_tower.image_encoder.layer) == 2
    for model in (mcan, visualbert, two_tower):
        assert model.eval()(batch).fused.shape == (len(QUERIES), model.fused_dim)

    pretrained = TwoTower.from_config(two_tower_config(layers=1, init_text_from_backbone=True))
    shipped = load_pretrained_encoder("minilm", num_layers=1)
    torch.testing.assert_close(pretrained.text_tower.state_dict(), shipped.state_dict())
    with pytest.raises(ValueError):
        TwoTower.from_config(two_tower_config(hidden=32, layers=1, init_text_from_backbone=True))
