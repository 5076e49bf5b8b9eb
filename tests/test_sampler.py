"""The static-cache sampler (pathvlm/sampler.py) against transformers' generate and the trainer's
log-prob pass, on the tiny model in fp32: greedy tokens equal generate's on a trained (peaked) model,
its log-probs equal rollout.Rows', and its draws follow the softmax (chi-square)."""

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import stats

from pathvlm.config import ConfigError, EvalConfig, GRPOConfig, ModelConfig, load_config
from pathvlm.generation import encode_prompts, generation_config, image_features, special_token_ids
from pathvlm.model import load_model
from pathvlm.records import Record, load_split, prompt_messages
from pathvlm.rollout import Rows, completion_logprobs, generate_groups
from pathvlm.sampler import gap_metrics, greedy, sample

# three prompts of different lengths (left padding differs), each taught its own answer: a short one,
# one that ends in mid-batch, one longer than max_new_tokens below
TAUGHT = [(Record("a", "x.png", "Stain?", ["brown", "blue"], "A"), "<answer>A</answer>"),
          (Record("b", "x.png", "Which stain dominates this patch of tissue?", ["brown", "blue", "mixed"], "C"),
           "<think>brown and blue</think><answer>C</answer>"),
          (Record("c", "x.png", "Colour of the nuclei in this immunohistochemistry patch, please?",
                  ["brown", "blue"], "B"), "<think>" + "blue nuclei, " * 12 + "</think><answer>B</answer>")]
MAX_NEW = 24


def image(h, w, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8))


def encode(processor, records, sizes=((56, 56), (84, 56), (56, 84))):
    return encode_prompts(processor, [prompt_messages(r) for r in records],
                          [image(h, w, i) for i, (h, w) in enumerate(sizes[:len(records)])], "cpu")


@pytest.fixture(scope="module")
def peaked():
    """The tiny model with its language model trained to write TAUGHT's answers: peaked logits, as a
    trained policy has, so that greedy decoding is not decided by float rounding."""
    torch.manual_seed(0)
    model, processor = load_model(ModelConfig(), trainable=False, lora=False)
    params = list(model.model.language_model.parameters()) + list(model.lm_head.parameters())
    for p in params:
        p.requires_grad_(True)
    prompt = encode(processor, [r for r, _ in TAUGHT])
    tok = processor.tokenizer
    rows = [tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for _, t in TAUGHT]
    width = max(map(len, rows))
    ids = torch.tensor([r + [tok.pad_token_id] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    optimizer = torch.optim.Adam(params, lr=3e-3)
    for _ in range(80):
        loss = -(completion_logprobs(model, prompt, ids, mask) * mask).sum() / mask.sum()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    for p in params:
        p.requires_grad_(False)
    return model, processor


def test_greedy_static_equals_generate_token_for_token_on_a_trained_model(peaked):
    model, processor = peaked
    prompt = encode(processor, [r for r, _ in TAUGHT])
    static, texts = greedy(model, processor, prompt, MAX_NEW, sampler="static")
    hf, hf_texts = greedy(model, processor, prompt, MAX_NEW, sampler="hf")
    # what the test claims to cover is there: left padding, a row ending in mid-batch, one cut at max_new_tokens
    assert prompt["attention_mask"][0, 0] == 0 and prompt["attention_mask"][2].all()
    assert static.truncated.tolist() == [False, False, True] and 1 < static.mask[0].sum() < static.mask[1].sum()
    assert torch.equal(static.ids, hf.ids) and torch.equal(static.mask, hf.mask) and texts == hf_texts
    assert texts[1] == TAUGHT[1][1]  # the model did learn its answers
    # after its stop token a row is padding, with log-prob 0, while the others go on
    assert (static.ids[0, static.mask[0] == 0] == processor.tokenizer.pad_token_id).all()
    assert (static.logprobs[0, static.mask[0] == 0] == 0).all() and (static.logprobs[static.mask == 1] < 0).all()


def test_greedy_groups_equal_generate_groups(peaked):
    """G rows per prompt from one prefill, greedy: each group is G copies of generate's answer."""
    model, processor = peaked
    prompt = encode(processor, [r for r, _ in TAUGHT])
    features = image_features(model, prompt)
    static = sample(model, processor.tokenizer, prompt, features, max_new_tokens=MAX_NEW, group_size=3)
    config = generation_config(processor.tokenizer, MAX_NEW)
    hf = generate_groups(model, prompt, features, 3, config)[:, prompt["input_ids"].shape[1]:]
    assert torch.equal(static.ids, hf.masked_fill(static.mask == 0, processor.tokenizer.pad_token_id))
    assert torch.equal(static.ids[0], static.ids[2]) and not torch.equal(static.ids[0], static.ids[3])


def test_a_stop_token_everywhere_ends_the_loop_early(peaked):
    """Once every row has stopped, no further step runs: the width is the longest completion."""
    model, processor = peaked
    prompt = encode(processor, [r for r, _ in TAUGHT[:2]])
    out, _ = greedy(model, processor, prompt, MAX_NEW)
    assert not out.truncated.any() and out.ids.shape[1] == int(out.mask.sum(1).max()) < MAX_NEW


@pytest.mark.parametrize("temperature, top_p", [(1.0, 1.0), (0.7, 1.0), (1.0, 0.9)])
def test_sampled_logprobs_equal_the_trainer_pass(demo_data, temperature, top_p):
    """The log-prob the sampler returns for each token equals rollout.Rows.logprobs (the GRPO step's
    pass, under the full softmax at that temperature) to 1e-5; with top_p < 1 too, which truncates
    what is drawn from but not what is scored."""
    torch.manual_seed(0)
    model, processor = load_model(ModelConfig(), trainable=False)
    model.eval()
    records = load_split(f"{demo_data}/rl.jsonl")[:3]
    prompt = encode(processor, records)
    features = image_features(model, prompt)
    out = sample(model, processor.tokenizer, prompt, features, max_new_tokens=20, group_size=4,
                 temperature=temperature, top_p=top_p)
    rows = Rows(model, prompt, features, out.ids, out.mask, 4, temperature, special_token_ids(processor.tokenizer))
    with torch.no_grad():
        scored = rows.logprobs(model, 0, 12, 1024, share_prompt=True)
    assert int(out.mask.sum()) > 40
    assert (out.logprobs - scored).abs().max().item() < 1e-5
    assert gap_metrics([[float((out.logprobs - scored).abs().sum()), int(out.mask.sum()), 0.0]])[
        "sampler/logp_gap_mean"] < 1e-6


def first_token_distribution(model, processor, prompt, temperature, top_p=1.0):
    """softmax(logits / temperature) of the prompt's next token, special tokens out, from a plain
    forward pass; truncated to its top_p mass and renormalised when top_p < 1."""
    with torch.no_grad():
        logits = model(**prompt).logits[0, -1].float()
    logits[special_token_ids(processor.tokenizer)] = float("-inf")
    p = (logits / temperature).softmax(-1)
    if top_p < 1:
        sorted_p, order = p.sort(descending=True)
        sorted_p[sorted_p.cumsum(0) - sorted_p >= top_p] = 0
        p = torch.zeros_like(p).scatter(0, order, sorted_p)
    p = p.double().numpy()
    return p / p.sum()  # float32's softmax sums to 1 within 1e-7; chisquare wants the totals equal


def chi_square_p(counts: np.ndarray, p: np.ndarray) -> float:
    """Pearson's test of counts against probabilities p, the rarest tokens pooled so that every cell
    expects at least 5 draws."""
    expected = p * counts.sum()
    order = np.argsort(expected)
    cells_c, cells_e, acc_c, acc_e = [], [], 0.0, 0.0
    for i in order:
        acc_c, acc_e = acc_c + counts[i], acc_e + expected[i]
        if acc_e >= 5:
            cells_c.append(acc_c)
            cells_e.append(acc_e)
            acc_c, acc_e = 0.0, 0.0
    cells_c[-1] += acc_c
    cells_e[-1] += acc_e
    assert counts[p == 0].sum() == 0, "a token outside the distribution was drawn"
    return stats.chisquare(cells_c, cells_e).pvalue


@pytest.mark.parametrize("temperature, top_p", [(1.0, 1.0), (0.5, 1.0), (1.0, 0.8)])
def test_draws_follow_the_softmax(temperature, top_p):
    """20,000 draws of one decode step (one prompt's group of 20,000 rows) against softmax(logits / T):
    a chi-square test that would fail at p < 0.001. Checked to reject a sampler at 1.5 T."""
    torch.manual_seed(0)
    model, processor = load_model(ModelConfig(), trainable=False)
    model.eval()
    with torch.no_grad():  # the random model's logits are nearly flat; spread them so T matters
        model.lm_head.weight.mul_(8)
    prompt = encode(processor, [TAUGHT[1][0]])
    out = sample(model, processor.tokenizer, prompt, image_features(model, prompt), max_new_tokens=1,
                 group_size=20_000, temperature=temperature, top_p=top_p)
    vocab = model.lm_head.out_features
    counts = np.bincount(out.ids[:, 0].numpy(), minlength=vocab).astype(float)
    assert chi_square_p(counts, first_token_distribution(model, processor, prompt, temperature, top_p)) > 1e-3
    wrong = first_token_distribution(model, processor, prompt, temperature * 1.5, top_p)
    assert (counts[wrong == 0].sum() > 0) or chi_square_p(counts, wrong) < 1e-3  # the test can fail


def test_cuda_graph_on_a_cpu_falls_back_with_one_line(peaked, capsys):
    model, processor = peaked
    prompt = encode(processor, [r for r, _ in TAUGHT])
    plain, _ = greedy(model, processor, prompt, MAX_NEW)
    graphed, _ = greedy(model, processor, prompt, MAX_NEW, cuda_graph=True)
    assert torch.equal(plain.ids, graphed.ids)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("cuda_graph:")]
    assert len(lines) == 1 and "without a graph" in lines[0]


def test_sampler_keys_are_checked():
    assert GRPOConfig().sampler == "static" and EvalConfig().cuda_graph == "auto"
    with pytest.raises(ConfigError, match="flash_attention_2"):
        load_config(EvalConfig, None, ["attn_implementation=flash_attention_2"])
    with pytest.raises(ConfigError, match="sampler=hf"):
        load_config(EvalConfig, None, ["backend=unsloth", "sampler=static"])
    assert load_config(EvalConfig, None, ["attn_implementation=flash_attention_2", "sampler=hf"]).sampler == "hf"
    with pytest.raises(ConfigError, match="sampler"):
        load_config(GRPOConfig, None, ["sampler=vllm"])


def test_eager_attention_gives_the_same_tokens(peaked):
    """The additive mask for attn_implementation=eager hides the same columns as sdpa's boolean one."""
    model, processor = peaked
    prompt = encode(processor, [r for r, _ in TAUGHT])
    sdpa, _ = greedy(model, processor, prompt, MAX_NEW)
    model.set_attn_implementation("eager")
    try:
        eager, _ = greedy(model, processor, prompt, MAX_NEW)
    finally:
        model.set_attn_implementation("sdpa")
    assert torch.equal(sdpa.ids, eager.ids) and (sdpa.logprobs - eager.logprobs).abs().max() < 1e-5
