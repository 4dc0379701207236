"""Hugging Face models as people call them: tiny configs, random weights, eval mode, a dict batch (input_ids and
an attention_mask with padding, or pixel_values), the loss a function of out.logits (BERT, DistilBERT, RoBERTa,
ViT, Llama, GPT-2 with its own head or its head tied to the embedding). The engine takes them with
method="auto" and no warning (a trace with the call's values: backprop/graph/value_trace.py), exact against one
float64 Hessian-vector product per sampled entry. Skipped where transformers is not installed (an optional test
dependency: `pip install --no-deps transformers tokenizers regex httpx2 httpcore2 truststore`)."""

import importlib
import importlib.util

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_engine_or_cheaper
from torch.func import functional_call

from torch_secorder import explain_method, model_hessian_diagonal
from torch_secorder.testing import sampled_hessian_diagonal

VOCABULARY, WIDTH = 50, 16


def import_transformers():
    if importlib.util.find_spec("transformers") is None:
        pytest.skip("transformers is not installed")
    return importlib.import_module("transformers")


def build(name, transformers):
    t = transformers
    text = dict(vocab_size=VOCABULARY, num_attention_heads=2, intermediate_size=32)
    if name == "bert":
        config = t.BertConfig(hidden_size=WIDTH, num_hidden_layers=1, max_position_embeddings=16, num_labels=3, **text)
        return t.BertForSequenceClassification(config)
    if name == "distilbert":  # nn.ReLU() made inside its forward
        config = t.DistilBertConfig(
            vocab_size=VOCABULARY, dim=WIDTH, n_layers=1, n_heads=2, hidden_dim=32, max_position_embeddings=16
        )
        config.num_labels = 3
        return t.DistilBertForSequenceClassification(config)
    if name == "roberta":  # position ids from the padding mask (cumsum)
        config = t.RobertaConfig(
            hidden_size=WIDTH, num_hidden_layers=1, max_position_embeddings=20, num_labels=3, **text
        )
        return t.RobertaForSequenceClassification(config)
    assert name == "vit"
    config = t.ViTConfig(
        image_size=16, patch_size=8, hidden_size=WIDTH, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32, num_labels=3,
    )  # fmt: skip
    return t.ViTForImageClassification(config)


def batch_for(name, generator):
    if name == "vit":
        return {"pixel_values": torch.randn(2, 3, 16, 16, dtype=torch.float64, generator=generator)}
    ids = torch.randint(0, VOCABULARY, (2, 6), generator=generator)
    return {"input_ids": ids, "attention_mask": torch.tensor([[1] * 6, [1] * 4 + [0] * 2])}  # padding


def logits_cross_entropy(out, labels):
    return F.cross_entropy(out.logits, labels)


def assert_auto_exact(model, loss_fn, batch, targets, per_parameter=3, tolerance=1e-10):
    generator = torch.Generator().manual_seed(3)
    choice = explain_method(model, loss_fn, batch, targets=targets)
    assert choice.method == "backprop", choice
    assert_engine_or_cheaper(model, loss_fn, batch, targets)
    actual = model_hessian_diagonal(model, loss_fn, batch, targets, method="backprop")
    names, params = zip(*model.named_parameters())
    picks = [
        (i, k) for i, p in enumerate(params) for k in torch.randperm(p.numel(), generator=generator)[:per_parameter]
    ]
    picks += [(i, int(a.reshape(-1).abs().argmax())) for i, a in enumerate(actual)]

    def loss_of_params(*values):
        return loss_fn(functional_call(model, dict(zip(names, values)), args=(), kwargs=batch), targets)

    expected = sampled_hessian_diagonal(loss_of_params, list(params), picks)
    scale = max(abs(value) for value in expected.values())
    error = max(abs(actual[i].reshape(-1)[int(k)].item() - value) for (i, k), value in expected.items()) / scale
    assert error < tolerance, error


@pytest.mark.parametrize("name", ["bert", "distilbert", "roberta", "vit"])
def test_classifiers_with_dict_batches_and_a_loss_on_logits(name):
    transformers = import_transformers()
    torch.manual_seed(0)
    model = build(name, transformers).double().eval()
    generator = torch.Generator().manual_seed(1)
    assert_auto_exact(model, logits_cross_entropy, batch_for(name, generator), torch.tensor([0, 2]))


def test_loss_on_logits_by_key_and_with_options():
    transformers = import_transformers()
    torch.manual_seed(0)
    model = build("bert", transformers).double().eval()
    batch = batch_for("bert", torch.Generator().manual_seed(1))
    assert_auto_exact(
        model, lambda out, y: F.cross_entropy(out["logits"], y, label_smoothing=0.1), batch, torch.tensor([1, 2])
    )


def shifted_language_model_loss(out, labels):
    """The causal-LM loss as written in training scripts: logits for positions 0..L-2 predict tokens 1..L-1."""
    return F.cross_entropy(out.logits[:, :-1].reshape(-1, VOCABULARY), labels[:, 1:].reshape(-1), ignore_index=-100)


def rms_norm_in_the_model_precision(module, hidden):
    """LlamaRMSNorm computes in float32 whatever the model's dtype: the float64 reference and the engine would
    both round there (differently). The same function without that cast, for a float64 check."""
    variance = hidden.pow(2).mean(-1, keepdim=True)
    return module.weight * (hidden * torch.rsqrt(variance + module.variance_epsilon))


def test_llama_with_a_shifted_language_model_loss(monkeypatch):
    transformers = import_transformers()
    from transformers.models.llama import modeling_llama

    monkeypatch.setattr(modeling_llama.LlamaRMSNorm, "forward", rms_norm_in_the_model_precision)
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=VOCABULARY, hidden_size=WIDTH, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
        intermediate_size=32, max_position_embeddings=16,
    )  # fmt: skip
    model = transformers.LlamaForCausalLM(config).double().eval()
    generator = torch.Generator().manual_seed(1)
    batch = batch_for("llama", generator)
    labels = torch.randint(0, VOCABULARY, (2, 6), generator=generator)
    labels[1, 4:] = -100  # the padding
    assert_auto_exact(model, shifted_language_model_loss, batch, labels)
    # the loss on out.logits with the class axis moved: the same engine, another reading
    assert_auto_exact(model, lambda out, y: F.cross_entropy(out.logits.transpose(1, 2), y), batch, labels.clamp(0))


def test_sums_and_scalings_of_losses_on_logits():
    """Read by what they compute (losses/output_function.py): the per-sample Hessian in out.logits from
    Hessian-vector products of the loss function alone."""
    transformers = import_transformers()
    torch.manual_seed(0)
    model = build("bert", transformers).double().eval()
    batch = batch_for("bert", torch.Generator().manual_seed(1))

    def with_z_loss(out, y):  # a classifier's loss plus a penalty on the log-normaliser
        return F.cross_entropy(out.logits, y) + 1e-2 * out.logits.logsumexp(-1).pow(2).mean()

    assert_auto_exact(model, with_z_loss, batch, torch.tensor([0, 2]))
    model = build("vit", transformers).double().eval()
    batch = batch_for("vit", torch.Generator().manual_seed(1))
    assert_auto_exact(model, lambda out, y: F.huber_loss(out.logits, y, delta=0.5), batch, torch.randn(2, 3).double())


def gpt2(tied):
    """(a one-layer GPT2LMHeadModel, a dict batch, its labels with the padding ignored)."""
    transformers = import_transformers()
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=VOCABULARY, n_positions=16, n_embd=WIDTH, n_layer=1, n_head=2, tie_word_embeddings=tied,
        bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    generator = torch.Generator().manual_seed(1)
    batch = batch_for("gpt2", generator)
    labels = torch.randint(0, VOCABULARY, (2, 6), generator=generator)
    labels[1, 4:] = -100
    return transformers.GPT2LMHeadModel(config).double().eval(), batch, labels


def test_gpt2_with_its_own_head():
    """GPT-2's Conv1D projections (addmm on the batch folded into rows) are read as x @ weight + bias
    (backprop/graph/hf_conv1d.py)."""
    model, batch, labels = gpt2(tied=False)
    assert_auto_exact(model, shifted_language_model_loss, batch, labels)


def test_gpt2_with_its_head_tied_to_the_embedding():
    """GPT-2's default: lm_head reads wte.weight, which the embedding read first. Besides the projections summed
    over both uses, the Hessian has the head's mixed term (its output is bilinear in the weight and in an input
    the embedding moves): formed from one column per input feature of the head (graph/engine.py _mixed_terms)."""
    model, batch, labels = gpt2(tied=True)
    assert model.lm_head.weight is model.transformer.wte.weight
    assert_auto_exact(model, shifted_language_model_loss, batch, labels, per_parameter=40)


def test_sums_of_language_model_losses_keep_their_structure():
    """A sum of cross-entropies on the shifted logits (one with label smoothing, one scaled) plus a parameter
    penalty: read as the losses' own factors added (losses/loss_sum.py), not as a dense per-sample Hessian of all
    sequence x vocabulary logits; the penalty adds its own diagonal."""
    from torch_secorder.losses.loss_sum import LossSum
    from torch_secorder.losses.recognise import recognise

    model, batch, labels = gpt2(tied=True)

    def smoothed(out, labels):
        logits = out.logits[:, :-1].reshape(-1, VOCABULARY)
        return F.cross_entropy(logits, labels[:, 1:].reshape(-1), ignore_index=-100, label_smoothing=0.1)

    def summed(out, y):
        return shifted_language_model_loss(out, y) - 0.25 * smoothed(out, y) / 2

    def penalised(out, y):
        return summed(out, y) + 1e-3 * sum(p.pow(2).sum() for p in model.parameters())

    assert isinstance(recognise(summed, functions=True), LossSum)
    assert_auto_exact(model, summed, batch, labels, per_parameter=20)
    plain = model_hessian_diagonal(model, summed, batch, labels, method="backprop")
    with_penalty = model_hessian_diagonal(model, penalised, batch, labels, method="backprop")
    for a, b in zip(with_penalty, plain):  # the penalty's own Hessian: 2e-3 on every entry
        torch.testing.assert_close(a - b, torch.full_like(a, 2e-3), rtol=0, atol=1e-12)
