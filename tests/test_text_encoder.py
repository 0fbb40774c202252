"""Text encoder and tokenizer against transformers on the same weights."""
import logging

import pytest
import torch
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from mobilediffusion.loading import load_text_encoder
from mobilediffusion.text_encoder import PACKAGED_TOKENIZER, TextEncoder
from mobilediffusion.config import TextEncoderConfig

PROMPTS = [
    "a photo of a cat",
    "A red circle, in the top-left; on a WHITE background!!",
    "naïve café — crème brûlée 🍮 (très jolie)",
    "",
    " ".join(["astronaut riding a horse"] * 30),  # > 77 tokens
]


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(scope="module")
def reference_tokenizer():
    return CLIPTokenizer.from_pretrained(str(PACKAGED_TOKENIZER))


def test_known_ids():
    # CLIP's BPE ids for these words are well known: a=320, photo=1125, of=539, cat=2368
    ids = TextEncoder(TextEncoderConfig(num_hidden_layers=1, hidden_size=8, intermediate_size=8,
                                        num_attention_heads=1)).tokenize(["a photo of a cat"])
    assert ids.shape == (1, 77) and ids.dtype == torch.long
    assert ids[0, :7].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert (ids[0, 7:] == 49407).all()  # padded with <|endoftext|>


def test_ids_equal_clip_tokenizer(reference_tokenizer, caplog):
    enc = TextEncoder(TextEncoderConfig(num_hidden_layers=1, hidden_size=8, intermediate_size=8, num_attention_heads=1))
    with caplog.at_level(logging.WARNING, logger="mobilediffusion.text_encoder"):
        ids = enc.tokenize(PROMPTS)
    ref = reference_tokenizer(PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    assert torch.equal(ids, ref.input_ids)
    assert ids[-1, -1].item() == 49407  # the long prompt keeps its EOS after truncation
    warnings = [r for r in caplog.records if "longer than" in r.getMessage()]
    assert len(warnings) == 1  # only the long prompt warns


def _random_clip(cfg: CLIPTextConfig, tmp_path):
    torch.manual_seed(0)
    model = CLIPTextModel(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)  # no parameter keeps a trivial initial value
    model.save_pretrained(tmp_path)
    return model


@pytest.mark.parametrize(
    "act,layers,width,heads",
    [("quick_gelu", 2, 32, 4), ("gelu", 3, 48, 3)],  # ViT-L/14-like, OpenCLIP-H-like (SD2)
)
def test_encoder_matches_transformers(tmp_path, reference_tokenizer, act, layers, width, heads):
    cfg = CLIPTextConfig(vocab_size=49408, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=layers,
                         num_attention_heads=heads, max_position_embeddings=77, hidden_act=act)
    ref = _random_clip(cfg, tmp_path)
    enc = load_text_encoder(tmp_path)
    assert enc.config.hidden_act == act and enc.config.num_hidden_layers == layers
    ids = enc.tokenize(PROMPTS)
    with torch.no_grad():
        ours = enc.encode(ids)
        theirs = ref(input_ids=ids).last_hidden_state
    assert ours.shape == (len(PROMPTS), 77, width)
    assert rel_err(ours, theirs) <= 1e-5


def test_checkpoint_that_does_not_fit(tmp_path):
    from mobilediffusion.errors import CheckpointError
    from mobilediffusion.weights.keymap import load_state

    cfg = CLIPTextConfig(vocab_size=49408, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2)
    state = CLIPTextModel(cfg).state_dict()
    enc = TextEncoder(TextEncoderConfig(hidden_size=16, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=2))
    from mobilediffusion.weights.text_keys import clip_text_keymap

    with pytest.raises(CheckpointError, match="fc1.weight"):
        load_state(enc.model, state, clip_text_keymap(enc.key_prefix), what="text encoder")


@pytest.mark.parametrize("saved_prefix", ["text_model.", ""])
def test_both_key_spellings_load(saved_prefix):
    """Released SD checkpoints say text_model.*, transformers 5 saves bare names: both load."""
    from mobilediffusion.weights.keymap import load_state
    from mobilediffusion.weights.text_keys import clip_text_keymap

    cfg = TextEncoderConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    src = TextEncoder(cfg)
    state = {saved_prefix + k.removeprefix("text_model."): v for k, v in src.model.state_dict().items()}
    state[saved_prefix + "embeddings.position_ids"] = torch.arange(77)[None]  # as older exports saved it
    dst = TextEncoder(cfg)
    load_state(dst.model, state, clip_text_keymap(dst.key_prefix), what="text encoder")
    ids = src.tokenize(["a cat"])
    assert torch.equal(src.encode(ids), dst.encode(ids))
