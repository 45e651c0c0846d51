"""torch_ext.fuse on Hugging Face transformers models, built from tiny configs (random
init, no download): BERT, RoBERTa, ViT, GPT-2, Llama, Mistral, Qwen2, T5 (relu and gated-gelu).

For each: the MLP blocks are reported replaced (and are: FusedLinear / FusedConv1D / fused_mlp),
the loss, the logits (when returned) and every parameter's gradient equal the unfused model's in
train mode (dropout 0) and eval mode, state_dicts load both ways, whole models pickle (no exec or
compile while loading, in this process and in a new one), torch.compile runs, and 20
training steps track the unfused loss curve. Causal LMs: the loss from linear_cross_entropy on the
hidden states with HF's semantics (shifted labels, -100, num_items_in_batch, shift_labels).
Plus what fuse() must refuse: a renamed formula, a Linear named by code above it.
"""
from __future__ import annotations

import copy
import inspect
import os
import subprocess
import sys
import warnings
from collections import OrderedDict

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers", reason="transformers is not installed (pip install torch_ext[test])")

import torch_ext  # noqa: E402
from torch_ext import FusedLinear  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from test_fuse import TorchExtOps, assert_same_outputs_and_grads, load_in_new_process, round_trip  # noqa: E402
from utils import SavedTensorBytes, assert_close  # noqa: E402

# Every test on every device (tests/devices.py).
pytestmark = pytest.mark.every_device

tf = transformers
CAUSAL = ("gpt2", "llama", "mistral", "qwen2", "phi3")


def build(family: str, seed: int = 0) -> nn.Module:
    """A tiny model of `family`, dropout 0, random init from `seed`."""
    torch.manual_seed(seed)
    bert = dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    decoder = dict(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                   num_key_value_heads=1)
    t5 = dict(vocab_size=100, d_model=32, d_kv=16, d_ff=64, num_layers=2, num_heads=2, dropout_rate=0.0,
              decoder_start_token_id=0, pad_token_id=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if family == "bert":
            return tf.BertForSequenceClassification(tf.BertConfig(**bert))
        if family == "roberta":
            return tf.RobertaForSequenceClassification(tf.RobertaConfig(**bert))
        if family == "vit":
            cfg = {k: v for k, v in bert.items() if k != "vocab_size"}
            return tf.ViTForImageClassification(tf.ViTConfig(image_size=16, patch_size=8, **cfg))
        if family == "clip":  # QuickGELU; its _init_weights names the MLP's fc1 and fc2
            vision = dict(image_size=16, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=2)
            text = dict(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=2, max_position_embeddings=16, bos_token_id=0, eos_token_id=0)
            return tf.CLIPForImageClassification(tf.CLIPConfig(vision_config=vision, text_config=text, num_labels=3))
        if family == "bloom":  # BloomGelu (its own autograd Function in training); its head keeps its logits
            return tf.BloomForCausalLM(tf.BloomConfig(vocab_size=100, hidden_size=32, n_layer=2, n_head=2,
                                                      hidden_dropout=0.0, attention_dropout=0.0, bos_token_id=0,
                                                      eos_token_id=0, pad_token_id=0))
        if family == "falcon":  # FalconLinear (an nn.Linear subclass); its head keeps its logits
            return tf.FalconForCausalLM(tf.FalconConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2,
                                                        num_attention_heads=2, ffn_hidden_size=128, hidden_dropout=0.0,
                                                        attention_dropout=0.0, bos_token_id=0, eos_token_id=0))
        if family == "gpt2":
            return tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=100, n_positions=32, n_embd=32, n_layer=2, n_head=2,
                                                    resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                                    bos_token_id=0, eos_token_id=0))
        if family == "llama":
            return tf.LlamaForCausalLM(tf.LlamaConfig(**decoder))
        if family == "mistral":
            return tf.MistralForCausalLM(tf.MistralConfig(**decoder))
        if family == "qwen2":
            return tf.Qwen2ForCausalLM(tf.Qwen2Config(**decoder))
        if family == "distilbert":  # its FFN's forward hands the pair to ff_chunk via apply_chunking_to_forward
            return tf.DistilBertForSequenceClassification(tf.DistilBertConfig(
                vocab_size=100, dim=32, hidden_dim=64, n_layers=2, n_heads=2, dropout=0.0, attention_dropout=0.0,
                seq_classif_dropout=0.0, num_labels=3))
        if family == "albert":  # one layer shared by every layer; its pair in ff_chunk, among forward's statements
            return tf.AlbertForSequenceClassification(tf.AlbertConfig(
                vocab_size=100, embedding_size=16, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                intermediate_size=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                classifier_dropout_prob=0.0, num_labels=3))
        if family == "modernbert":  # its MLP's Wi holds [gate; up], with a dropout before Wo
            return tf.ModernBertForSequenceClassification(tf.ModernBertConfig(
                vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                num_labels=3, pad_token_id=0, bos_token_id=0, eos_token_id=0, cls_token_id=0, sep_token_id=0))
        if family == "phi3":  # its MLP's gate_up_proj holds [gate; up]
            return tf.Phi3ForCausalLM(tf.Phi3Config(**decoder, pad_token_id=0, bos_token_id=0, eos_token_id=0))
        if family == "opt":  # (not one of the docstring's families: its lm_head(h).contiguous())
            return tf.OPTForCausalLM(tf.OPTConfig(vocab_size=100, hidden_size=32, ffn_dim=64, num_hidden_layers=2,
                                                  num_attention_heads=2, word_embed_proj_dim=32, dropout=0.0))
        if family == "t5":
            return tf.T5ForConditionalGeneration(tf.T5Config(**t5))
        if family == "t5-gated":
            return tf.T5ForConditionalGeneration(tf.T5Config(feed_forward_proj="gated-gelu", **t5))
    raise ValueError(family)


FAMILIES = ["bert", "roberta", "distilbert", "albert", "modernbert", "vit", "clip", "gpt2", "bloom", "falcon", "llama",
            "mistral", "qwen2", "phi3", "t5", "t5-gated"]

# The MLP blocks each family must report replaced, one per layer ({i}): a substring of the line.
MLP_LINES = {
    "bert": ["bert.encoder.layer.{i}.intermediate.dense (Linear 32->64) + gelu"],
    "roberta": ["roberta.encoder.layer.{i}.intermediate.dense (Linear 32->64) + gelu"],
    "vit": ["vit.layers.{i}.mlp (ViTMLP: fc1, fc2 + GELUActivation) -> torch_ext.fused_mlp gelu (in its forward)"],
    "clip": ["vision_model.encoder.layers.{i}.mlp (CLIPMLP: fc1, fc2 + QuickGELUActivation) "
             "-> torch_ext.fused_mlp quick_gelu (in its forward)"],
    "gpt2": ["transformer.h.{i}.mlp (GPT2MLP: c_fc, c_proj + NewGELUActivation) "
             "-> torch_ext.fused_mlp gelu_tanh (in its forward)"],
    "bloom": ["transformer.h.{i}.mlp.dense_h_to_4h (Linear 32->128) + gelu_tanh (BloomGelu) -> FusedLinear"],
    "falcon": ["transformer.h.{i}.mlp.dense_h_to_4h (FalconLinear 32->128) + gelu (GELUActivation) -> FusedLinear"],
    "llama": ["model.layers.{i}.mlp (LlamaMLP: gate_proj, up_proj, down_proj + SiLUActivation) "
              "-> torch_ext.fused_mlp swiglu"],
    "mistral": ["model.layers.{i}.mlp (MistralMLP: gate_proj, up_proj, down_proj + SiLUActivation) "
                "-> torch_ext.fused_mlp swiglu"],
    "qwen2": ["model.layers.{i}.mlp (Qwen2MLP: gate_proj, up_proj, down_proj + SiLUActivation) "
              "-> torch_ext.fused_mlp swiglu"],
    "distilbert": ["distilbert.transformer.layer.{i}.ffn.lin1 (Linear 32->64) + gelu (GELUActivation) -> FusedLinear "
                   "(in FFN.ff_chunk, rewritten on its own)"],
    "albert": ["albert.encoder.albert_layer_groups.0.albert_layers.0.ffn (Linear 32->64) + gelu_tanh "
               "(NewGELUActivation) -> FusedLinear (in AlbertLayer.ff_chunk, rewritten on its own)"],  # (shared: once)
    "modernbert": ["model.layers.{i}.mlp (ModernBertMLP: Wi [gate; up], Wo + GELUActivation) "
                   "-> torch_ext.fused_mlp geglu (unfused while its dropout self.drop is active"],
    "phi3": ["model.layers.{i}.mlp (Phi3MLP: gate_up_proj [gate; up], down_proj + SiLUActivation) "
             "-> torch_ext.fused_mlp swiglu"],
    "t5": ["encoder.block.{i}.layer.1.DenseReluDense.wi (Linear 32->64) + relu",
           "decoder.block.{i}.layer.2.DenseReluDense.wi (Linear 32->64) + relu"],
    "t5-gated": ["encoder.block.{i}.layer.1.DenseReluDense (T5DenseGatedActDense: wi_0, wi_1 + NewGELUActivation) "
                 "-> one GEMM + torch_ext's gated activation geglu_tanh",
                 "decoder.block.{i}.layer.2.DenseReluDense (T5DenseGatedActDense: wi_0, wi_1 + NewGELUActivation) "
                 "-> one GEMM + torch_ext's gated activation geglu_tanh"],
}
# The Linears feeding an activation in each family's MLP: never in the "left alone" lines.
MLP_INPUT_LINEARS = {"bert": "intermediate.dense", "roberta": "intermediate.dense", "vit": "mlp.fc", "clip": "mlp.fc",
                     "gpt2": "mlp.c_", "bloom": "mlp.dense_h_to_4h", "falcon": "mlp.dense_h_to_4h",
                     "llama": "mlp.", "mistral": "mlp.", "qwen2": "mlp.", "phi3": "mlp.", "modernbert": "mlp.",
                     "distilbert": "ffn.lin1", "albert": ".ffn (",
                     "t5": "DenseReluDense.wi ",
                     "t5-gated": "DenseReluDense.wi_"}
LM_LOSS_LINE = "lm_head, its loss) -> torch_ext.linear_cross_entropy"


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These models are tiny: with several intra-op threads each op's fork/join dominates, and on
    a loaded CI machine it made a BERT step hundreds of times slower than with one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def batch(family: str, seed: int = 0) -> dict:
    """A batch for `family`, the same numbers on every device (drawn on the CPU from `seed`), on
    the test's device."""
    g = torch.Generator().manual_seed(seed)
    if family in ("vit", "clip"):
        images = torch.randn(2, 3, 16, 16, generator=g, device="cpu")
        out = dict(pixel_values=images, labels=torch.tensor([0, 2], device="cpu"))
    else:
        ids = torch.randint(0, 100, (2, 7), generator=g, device="cpu")
        if family in ("bert", "roberta", "distilbert", "albert", "modernbert"):
            out = dict(input_ids=ids, labels=torch.tensor([0, 2], device="cpu"))
        elif family.startswith("t5"):
            out = dict(input_ids=ids, labels=torch.randint(0, 100, (2, 5), generator=g, device="cpu"))
        else:
            labels = ids.clone()
            labels[0, :2] = -100  # ignored positions
            out = dict(input_ids=ids, labels=labels)
    return {name: t.to(torch.get_default_device()) for name, t in out.items()}


def fuse(model, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # transformers' own config warnings
        return torch_ext.fuse(model, return_report=True, **kw)


def step(model, inputs):
    """Loss, logits and every parameter's gradient (by name) of one forward/backward."""
    model.zero_grad(set_to_none=True)
    out = model(**inputs)
    out.loss.backward()
    grads = {n.removeprefix("_orig_mod."): p.grad for n, p in model.named_parameters()}  # (torch.compile's wrapper)
    return out.loss.detach(), (None if out.logits is None else out.logits.detach()), grads


def assert_same_step(fused, ref, inputs, what: str):
    loss, logits, grads = step(fused, inputs)
    ref_loss, ref_logits, ref_grads = step(ref, inputs)
    assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6, msg=f"{what}: loss")
    if logits is not None and ref_logits is not None:  # a fused causal LM returns none with labels
        assert_close(logits, ref_logits, msg=f"{what}: logits")
    assert sorted(grads) == sorted(ref_grads), f"{what}: parameter names differ"
    for name, g in ref_grads.items():
        assert (g is None) == (grads[name] is None), f"{what}: gradient of {name} present in one model only"
        if g is not None:
            assert_close(grads[name], g, msg=f"{what}: gradient of {name}")


class _FusedModels:
    """family -> (reference, fused, report) on the test's device, each built once."""

    def __init__(self):
        self._built = {}

    def __getitem__(self, family: str):
        key = (torch.get_default_device(), family)
        if key not in self._built:
            ref = build(family)
            self._built[key] = (ref, *fuse(ref))
        return self._built[key]


@pytest.fixture(scope="module")
def fused_models():
    """The models the tests only read, built once per device and module."""
    return _FusedModels()


# ----------------------------------------------------------------------------------------------
# Every MLP block fused, and the same numbers.

@pytest.mark.parametrize("family", FAMILIES)
def test_report_lists_every_mlp_block(family, fused_models):
    _, fused, report = fused_models[family]
    for template in MLP_LINES[family]:
        for i in range(2):
            line = template.format(i=i)
            assert any(line in r for r in report.replaced), f"{line!r} not replaced:\n{report}"
    left = [s for s in report.skipped if MLP_INPUT_LINEARS[family] in s]
    assert not left, f"left alone in the MLPs:\n{report}"
    if family in CAUSAL:
        assert any(LM_LOSS_LINE in r for r in report.replaced), str(report)
        assert isinstance(fused.lm_head, nn.Linear)
    # What the report says is what the model holds.
    kinds = {type(m).__name__ for m in fused.modules()}
    if family in ("llama", "mistral", "qwen2"):
        mlp = fused.model.layers[0].mlp
        assert type(mlp).forward is not type(mlp).__mro__[1].forward
        assert isinstance(mlp, type(mlp).__mro__[1]) and type(mlp.gate_proj) is nn.Linear
    elif family == "modernbert":
        mlp = fused.model.layers[0].mlp
        assert isinstance(mlp, tf.models.modernbert.modeling_modernbert.ModernBertMLP) and type(mlp.Wi) is nn.Linear
        assert type(mlp).forward is not tf.models.modernbert.modeling_modernbert.ModernBertMLP.forward
    elif family == "phi3":
        mlp = fused.model.layers[0].mlp
        assert isinstance(mlp, tf.models.phi3.modeling_phi3.Phi3MLP) and type(mlp.gate_up_proj) is nn.Linear
        assert type(mlp).forward is not tf.models.phi3.modeling_phi3.Phi3MLP.forward
    elif family == "gpt2":
        mlp = fused.transformer.h[0].mlp
        assert type(mlp.c_fc) is type(mlp.c_proj) is tf.pytorch_utils.Conv1D
        assert type(mlp).forward is not tf.models.gpt2.modeling_gpt2.GPT2MLP.forward
    elif family == "vit":
        mlp = fused.vit.layers[0].mlp
        assert isinstance(mlp, tf.models.vit.modeling_vit.ViTMLP) and type(mlp.fc1) is type(mlp.fc2) is nn.Linear
        assert type(mlp).forward is not tf.models.vit.modeling_vit.ViTMLP.forward
    elif family == "clip":
        mlp = fused.vision_model.encoder.layers[0].mlp
        assert isinstance(mlp, tf.models.clip.modeling_clip.CLIPMLP) and type(mlp.fc1) is type(mlp.fc2) is nn.Linear
        assert type(mlp).forward is not tf.models.clip.modeling_clip.CLIPMLP.forward
    elif family == "t5-gated":
        ff = fused.encoder.block[0].layer[1].DenseReluDense
        assert isinstance(ff, tf.models.t5.modeling_t5.T5DenseGatedActDense) and type(ff.wi_0) is nn.Linear
        assert type(ff).forward is not tf.models.t5.modeling_t5.T5DenseGatedActDense.forward
    else:
        assert "FusedLinear" in kinds, str(report)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_same_loss_logits_and_gradients(family, training, fused_models):
    ref, fused, _ = fused_models[family]
    ref.train(training)
    fused.train(training)
    assert_same_step(fused, ref, batch(family), f"{family} ({'train' if training else 'eval'})")
    if family in CAUSAL:
        # Without labels the model gives its logits as before.
        ids = batch(family)["input_ids"]
        with torch.no_grad():
            assert_close(fused(input_ids=ids).logits, ref(input_ids=ids).logits, msg=f"{family}: logits without labels")


@pytest.mark.parametrize("family", FAMILIES)
def test_torch_func_functional_call_grad(family, fused_models):
    # torch.func.grad over torch.func.functional_call (functional training loops, meta-learning):
    # the fused model's loss gradients by name are the unfused model's under torch.func, and its
    # own plain backward's, to rounding (its MLPs run PyTorch's ops under torch.func).
    ref, fused, _ = fused_models[family]
    ref.train()
    fused.train()
    inputs = batch(family)

    def loss_grads(model):
        params = {n: p.detach() for n, p in model.named_parameters()}
        return torch.func.grad(lambda p: torch.func.functional_call(model, p, (), inputs).loss)(params)

    grads = loss_grads(fused)
    # BLOOM's own gelu is an autograd.Function without setup_context, which torch.func refuses: the
    # unfused model's gradients come from its plain backward (the fused model has no such Function).
    ref_grads = step(ref, inputs)[2] if family == "bloom" else loss_grads(ref)
    _, _, plain = step(fused, inputs)
    assert sorted(grads) == sorted(ref_grads) == sorted(plain)
    for name, g in grads.items():
        if plain[name] is None:  # a parameter the loss does not reach: torch.func gives zeros
            assert not g.any(), f"{family}: {name}"
            continue
        assert_close(g, plain[name], msg=f"{family}: gradient of {name} against the plain backward's")
        assert_close(g, ref_grads[name], msg=f"{family}: gradient of {name}")


@pytest.mark.parametrize("use_reentrant", [False, True], ids=["non_reentrant", "reentrant"])
@pytest.mark.parametrize("family", FAMILIES)
def test_gradient_checkpointing(family, use_reentrant):
    # model.gradient_checkpointing_enable(), which trainers switch on to fit larger batches: each
    # layer's forward runs again in backward, fused blocks (and the causal LM's fused head) included.
    # The same loss and gradients as the unfused model with checkpointing, and every parameter
    # the loss reaches without checkpointing gets its gradient (the reentrant variant silently
    # gives none to a layer whose inputs need no gradient). (CLIPForImageClassification's loss
    # does not reach its post_layernorm.)
    ref = build(family)
    _, _, plain_grads = step(ref, batch(family))
    unreached = sorted(name for name, g in plain_grads.items() if g is None)
    fused, report = fuse(ref)
    assert report.replaced, f"{family}: nothing fused"
    kwargs = {"use_reentrant": use_reentrant}
    if not ref.supports_gradient_checkpointing:  # (ALBERT): the fused model says the same, not more
        for model in (ref, fused):
            with pytest.raises(ValueError, match="does not support activation checkpointing"):
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # transformers' notes on use_cache and checkpointing
        for model in (ref, fused):
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
            model.train()
        assert fused.is_gradient_checkpointing, family
        assert_same_step(fused, ref, batch(family), f"{family} (checkpointing, use_reentrant={use_reentrant})")
        _, _, grads = step(fused, batch(family))
    missing = sorted(name for name, g in grads.items() if g is None)
    assert missing == unreached, f"{family}: no gradient for {missing}"


class _Adapter(nn.Module):
    """A low-rank adapter around a layer, as PEFT's LoRA installs one: base(x) + B(A(x)), with the
    base's weight and bias exposed as attributes (as PEFT's layers do)."""

    def __init__(self, base: nn.Module, rank: int = 2):
        super().__init__()
        self.base_layer = base
        in_features, out_features = (base.in_features, base.out_features) if isinstance(base, nn.Linear) else (
            base.nx, base.nf)  # transformers' Conv1D
        self.lora_A = nn.Linear(in_features, rank, bias=False)
        self.lora_B = nn.Linear(rank, out_features, bias=False)

    @property
    def weight(self):
        return self.base_layer.weight

    @property
    def bias(self):
        return self.base_layer.bias

    def forward(self, x):
        return self.base_layer(x) + self.lora_B(self.lora_A(x))


# A layer whose weights a fused forward reads, per rewritten family (and the causal LM's head), and
# each rewritten MLP's activation module: case -> (family, module path).
CHANGED_AFTER_FUSE = {
    "vit": ("vit", "vit.layers.0.mlp.fc1"), "gpt2": ("gpt2", "transformer.h.0.mlp.c_fc"),
    "clip": ("clip", "vision_model.encoder.layers.0.mlp.fc2"),
    "llama": ("llama", "model.layers.0.mlp.up_proj"),
    "t5-gated": ("t5-gated", "encoder.block.0.layer.1.DenseReluDense.wi_1"),
    "llama-head": ("llama", "lm_head"),
    "vit-act": ("vit", "vit.layers.0.mlp.activation_fn"), "gpt2-act": ("gpt2", "transformer.h.0.mlp.act"),
    "clip-act": ("clip", "vision_model.encoder.layers.0.mlp.activation_fn"),
    "llama-act": ("llama", "model.layers.0.mlp.act_fn"),
    "t5-gated-act": ("t5-gated", "encoder.block.0.layer.1.DenseReluDense.act"),
}


@pytest.mark.parametrize("how", ["adapter", "hook"])
@pytest.mark.parametrize("case", sorted(CHANGED_AFTER_FUSE))
def test_layers_changed_after_fuse_are_honoured(case, how):
    # A layer replaced (an adapter's wrapper) or hooked after fuse() still acts: the fused forward
    # that would read its weights runs through the layers instead (no adapter or hook skipped in
    # silence), and the model gives what the unfused model with the same change gives.
    family, path = CHANGED_AFTER_FUSE[case]
    ref = build(family)
    fused, _ = fuse(ref)
    before = step(fused, batch(family))[0]
    parent_path, name = path.rpartition(".")[::2]
    for model in (ref, fused):
        parent = model.get_submodule(parent_path)
        if how == "adapter":
            torch.manual_seed(1)  # the same adapter weights in both models
            # (an activation module is swapped for another activation)
            setattr(parent, name, nn.Tanh() if case.endswith("-act") else _Adapter(getattr(parent, name)))
        else:
            getattr(parent, name).register_forward_hook(lambda module, args, out: out.tanh() * 3)  # not linear
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert_same_step(fused, ref, batch(family), f"{case} ({how} after fuse)")
    assert any("replaced or hooked after fuse()" in str(w.message) for w in caught), case
    assert not torch.equal(step(fused, batch(family))[0], before), f"{case}: the {how} changed nothing"


@pytest.mark.parametrize("family", ["vit", "gpt2", "t5-gated"])
def test_edit_pickled_before_the_activation_was_recorded(family):
    # An edited forward's recipe pickled before it recorded the activation module (its Edit's
    # __dict__ without act / act_type) still rebuilds a module that gives the fused numbers, and
    # that runs through its layers, with PyTorch's function for the activation, once a Linear
    # is replaced.
    ref = build(family)
    fused, _ = fuse(ref)
    parent_path, name = CHANGED_AFTER_FUSE[f"{family}-act"][1].rpartition(".")[0].rpartition(".")[::2]
    module = fused.get_submodule(parent_path)._modules[name]
    rebuild, (cls, edit, state) = module.__reduce_ex__(2)
    assert edit.act is not None and edit.act_type is not None, edit
    old = copy.copy(edit)
    del old.__dict__["act"], old.__dict__["act_type"]  # as unpickled from the earlier recipe
    assert old.act is None and old.act_type is None
    fused.get_submodule(parent_path)._modules[name] = rebuild(cls, old, state)
    assert_same_step(fused, ref, batch(family), f"{family}: module rebuilt from an Edit without act")
    linear = CHANGED_AFTER_FUSE[family][1]
    for model in (ref, fused):
        parent, attr = linear.rpartition(".")[::2]
        torch.manual_seed(1)
        setattr(model.get_submodule(parent), attr, _Adapter(model.get_submodule(linear)))
    with pytest.warns(UserWarning, match="replaced or hooked after fuse"):
        assert_same_step(fused, ref, batch(family), f"{family}: adapter after fuse, Edit without act")


@pytest.mark.parametrize("family", FAMILIES)
def test_state_dict_loads_both_ways(family, fused_models):
    ref, fused, _ = fused_models[family]
    assert list(fused.state_dict()) == list(ref.state_dict())
    ref.eval()
    fused.eval()
    inputs = batch(family, seed=1)
    # The fused model's weights into a new unfused model...
    plain = build(family, seed=5).eval()
    plain.load_state_dict(fused.state_dict())
    assert_same_step(plain, fused, inputs, f"{family}: unfused model loaded from the fused one")
    # ... and an unfused model's weights into a new fused one.
    other, _ = fuse(build(family, seed=6))
    other.eval()
    other.load_state_dict(ref.state_dict())
    assert_same_step(other, ref, inputs, f"{family}: fused model loaded from the unfused one")


@pytest.mark.parametrize("family", ["vit", "gpt2", "llama", "t5-gated"])
def test_save_pretrained_loads_into_the_unfused_class(family, fused_models, tmp_path):
    ref, fused, _ = fused_models[family]
    fused.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        back = type(ref).from_pretrained(tmp_path)
    assert type(back) is type(ref)
    ref.eval()
    back.eval()
    assert_same_step(back, ref, batch(family), f"{family}: save_pretrained -> from_pretrained")


# The families whose MLPs fuse() gives a rewritten class: its forward edited from its source (ViT,
# GPT-2: fused_mlp; T5 gated: one GEMM and the gated activation) or fused_mlp on gate / up / down
# (Llama, whose causal LM's class is rewritten too, for its loss).
REWRITTEN_CLASSES = ["vit", "gpt2", "llama", "t5-gated"]


def step_and_ops(model, inputs):
    """step(model, inputs), and the torch_ext ops it calls with their counts."""
    with TorchExtOps() as ops:
        out = step(model, inputs)
    return out, ops


def assert_loaded_like_fused(loaded, fused, ref, family: str, what: str):
    """`loaded` has fused's classes (the same library classes under the rewritten ones) and
    state_dict, calls the same torch_ext ops and gives ref's loss, logits and gradients."""
    assert [type(m).__name__ for m in loaded.modules()] == [type(m).__name__ for m in fused.modules()], what
    assert [type(m).__mro__[1] for m in loaded.modules()] == [type(m).__mro__[1] for m in fused.modules()], what
    assert list(loaded.state_dict()) == list(fused.state_dict()), what
    for key, value in fused.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), f"{what}: {key}"
    for model in (ref, fused, loaded):
        model.train()
    inputs = batch(family)
    _, ops = step_and_ops(loaded, inputs)
    _, fused_ops = step_and_ops(fused, inputs)
    assert ops and ops == fused_ops, f"{what}: torch_ext ops {ops}, fused model's {fused_ops}"
    assert_same_step(loaded, ref, inputs, what)


@pytest.mark.parametrize("how", ["torch.save", "pickle", "deepcopy"])
@pytest.mark.parametrize("family", REWRITTEN_CLASSES)
def test_whole_model_pickles(family, how, fused_models):
    """torch.save / pickle / deepcopy of the whole fused model (its rewritten classes pickle as
    the library's class plus what fuse() changed) loads, running no exec and no compile but what
    reading a causal LM's class takes (no_source_execution), into a model like the fused one that
    gives the same numbers; it pickles again before its first call."""
    ref, fused, _ = fused_models[family]
    loaded = round_trip(fused, how, class_introspection=family in CAUSAL)
    again = round_trip(loaded, how, class_introspection=family in CAUSAL)
    assert_loaded_like_fused(loaded, fused, ref, family, f"{family} through {how}")
    assert_loaded_like_fused(again, fused, ref, family, f"{family} through {how} twice")


@pytest.mark.cpu_only("a subprocess loads models saved on the CPU")
def test_whole_models_load_in_a_new_process(fused_models, tmp_path):
    """torch.load of the whole fused models in a new process, where no rewritten forward is built
    or cached yet: it runs no exec or compile, and each model gives the same numbers and calls
    the same torch_ext ops as the fused one."""
    for family in REWRITTEN_CLASSES:
        fused_models[family][1].train()
    saved = {family: (fused_models[family][1], batch(family)) for family in REWRITTEN_CLASSES}
    results = load_in_new_process(
        saved, "{family: t.step_and_ops(model, inputs) for family, (model, inputs) in saved.items()}",
        str(tmp_path), imports="import test_fuse_transformers as t",
        class_introspection=True,  # (gpt2, llama: causal LMs)
    )
    for family, (fused, inputs) in saved.items():
        ref = fused_models[family][0].train()
        (loss, logits, grads), ops = results[family]
        (ref_loss, ref_logits, ref_grads) = step(ref, inputs)
        what = f"{family} loaded in a new process"
        assert ops and ops == step_and_ops(fused, inputs)[1], f"{what}: torch_ext ops {ops}"
        assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6, msg=f"{what}: loss")
        if logits is not None and ref_logits is not None:
            assert_close(logits, ref_logits, msg=f"{what}: logits")
        assert sorted(grads) == sorted(ref_grads), what
        for name, g in ref_grads.items():
            assert (g is None) == (grads[name] is None), f"{what}: gradient of {name}"
            if g is not None:
                assert_close(grads[name], g, msg=f"{what}: gradient of {name}")


@pytest.mark.parametrize("family", FAMILIES)
def test_torch_compile_runs(family, fused_models, dynamo_reset):
    """torch.compile of a fused model (aot_eager: dynamo and AOTAutograd with our fake kernels;
    inductor's code generation would take minutes on CPU for nothing fuse-specific)."""
    ref, fused, _ = fused_models[family]
    fused = copy.deepcopy(fused).train()
    ref.train()
    compiled = torch.compile(fused, backend="aot_eager")
    assert_same_step(compiled, ref, batch(family), f"{family} compiled")


@pytest.mark.parametrize("family", FAMILIES)
def test_training_tracks_the_unfused_loss_curve(family):
    ref = build(family)
    fused, _ = fuse(ref)
    losses = {}
    for name, model in (("ref", ref), ("fused", fused)):
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        curve = []
        for i in range(20):
            opt.zero_grad(set_to_none=True)
            loss = model(**batch(family, seed=i % 4)).loss
            loss.backward()
            opt.step()
            curve.append(loss.item())
        losses[name] = torch.tensor(curve)
    assert losses["ref"][-1] < losses["ref"][0], "the reference does not train: the check would be empty"
    assert_close(losses["fused"], losses["ref"], rtol=1e-3, atol=1e-4, msg=f"{family}: loss curve")


# ----------------------------------------------------------------------------------------------
# Causal LMs: HF's loss semantics on the hidden states.

def causal_pair(family="llama"):
    ref = build(family).train()
    fused, report = fuse(ref)
    assert type(fused.lm_head).__name__ == "CausalLMHead", str(report)
    assert any(LM_LOSS_LINE in r for r in report.replaced), str(report)
    return ref, fused


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt"])
def test_causal_lm_num_items_in_batch_and_shift_labels(family):
    ref, fused = causal_pair(family)
    inputs = batch(family)
    # Gradient accumulation: the sum over the tokens, divided by the count given.
    assert_same_step(fused, ref, dict(inputs, num_items_in_batch=torch.tensor(23)), f"{family}: num_items_in_batch")
    assert_same_step(fused, ref, dict(inputs, num_items_in_batch=11), f"{family}: num_items_in_batch as an int")
    # Labels already shifted by the caller.
    shifted = torch.randint(0, 100, inputs["labels"].shape)
    shifted[:, -2:] = -100
    args = dict(input_ids=inputs["input_ids"], labels=inputs["labels"], shift_labels=shifted)
    assert_same_step(fused, ref, args, f"{family}: shift_labels")


def test_causal_lm_logits_only_when_asked():
    ref, fused = causal_pair()
    inputs = batch("llama")
    out = fused(**inputs)
    assert out.logits is None and out.loss is not None
    asked = fused(**inputs, return_logits=True)
    expected = ref(**inputs)
    assert_close(asked.logits, expected.logits)
    assert_close(asked.loss, expected.loss, rtol=1e-5, atol=1e-6)
    # return_dict=False: a tuple without the logits, the loss first.
    as_tuple = fused(**inputs, return_dict=False)
    assert isinstance(as_tuple, tuple)
    assert_close(as_tuple[0], expected.loss, rtol=1e-5, atol=1e-6)
    assert len(as_tuple) == len(out.to_tuple()) == len(expected.to_tuple()) - 1  # all but the logits
    assert not any(torch.is_tensor(t) and t.dim() > 0 and t.shape[-1] == 100 for t in as_tuple)
    # logits_to_keep without labels (generation): the last positions' logits, as before.
    ids = inputs["input_ids"]
    with torch.no_grad():
        assert_close(fused(input_ids=ids, logits_to_keep=1).logits, ref(input_ids=ids, logits_to_keep=1).logits)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_causal_lm_saves_no_logits(family):
    """The point of it: with labels, nothing of the logits' size is kept for backward (the
    unfused model keeps at least one (tokens, vocab) tensor)."""
    ref = build(family).train()
    fused, _ = fuse(ref)
    inputs = batch(family)
    tokens = inputs["input_ids"].numel()
    for model, keeps_logits in ((ref, True), (fused, False)):
        with SavedTensorBytes() as rec:
            loss = model(**inputs).loss
        shaped_like_logits = [tuple(t.shape) for t in rec.saved
                              if t.dim() >= 2 and t.shape[-1] == 100 and t.numel() >= tokens * 100]
        assert bool(shaped_like_logits) == keeps_logits, f"{type(model).__name__}: saved {shaped_like_logits}"
        loss.backward()


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_causal_lm_generates_as_before(family):
    ref = build(family).eval()
    fused, _ = fuse(ref)
    params = inspect.signature(fused.forward).parameters
    assert "logits_to_keep" in params and "return_logits" in params  # what generate() looks for
    ids = batch(family)["input_ids"][:, :4]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = fused.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
        want = ref.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert torch.equal(got, want)


def test_causal_lm_head_keeps_parameters_and_tied_weights():
    ref = build("gpt2")
    fused, _ = fuse(ref, inplace=True)
    assert fused is ref
    assert fused.lm_head.weight is fused.transformer.wte.weight, "GPT-2's tied LM head weight must stay tied"
    assert isinstance(fused, tf.GPT2LMHeadModel)
    clone = copy.deepcopy(fused)
    assert clone.lm_head.weight is clone.transformer.wte.weight
    inputs = batch("gpt2")
    assert_same_step(clone, build("gpt2"), inputs, "deep copy of a fused GPT-2")


def test_causal_lm_with_a_changed_forward_is_left_alone():
    """A forward that does more with the logits than the loss (softcapping) keeps its LM head."""

    class Capped(tf.LlamaForCausalLM):
        def forward(self, input_ids=None, labels=None, **kwargs):
            hidden = self.model(input_ids=input_ids).last_hidden_state
            logits = self.lm_head(hidden)
            logits = torch.tanh(logits / 30.0) * 30.0
            loss = None if labels is None else self.loss_function(logits=logits, labels=labels, vocab_size=100)
            return tf.modeling_outputs.CausalLMOutputWithPast(loss=loss, logits=logits)

    torch.manual_seed(0)
    model = Capped(build("llama").config)
    fused, report = fuse(model)
    assert not any(LM_LOSS_LINE in r for r in report.replaced), str(report)
    assert any("lm_head, its loss)" in s and "does more with logits than the loss" in s
               for s in report.skipped), str(report)
    assert type(fused.lm_head) is nn.Linear
    assert_same_step(fused, model, batch("llama"), "softcapped LM")


def test_gemma2_final_logit_softcapping_becomes_the_loss_softcap():
    """Gemma 2 caps its logits (softcap * tanh(logits / softcap)) before the loss: the fused model's
    loss must cap them too (linear_cross_entropy's softcap from config.final_logit_softcapping),
    not silently drop it; the config keeps its value, and without labels the logits are capped."""
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = tf.Gemma2Config(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                                 final_logit_softcapping=0.5, attn_logit_softcapping=None)
        model = tf.Gemma2ForCausalLM(config)
    # Large enough logits that the cap matters: without it the loss differs.
    with torch.no_grad():
        model.lm_head.weight.mul_(50.0)
    fused, report = fuse(copy.deepcopy(model))
    line = next(r for r in report.replaced if LM_LOSS_LINE in r)
    assert "softcap=config.final_logit_softcapping" in line, line
    inputs = batch("llama")
    assert_same_step(fused, model, inputs, "Gemma 2 with final-logit softcapping")
    assert fused.config.final_logit_softcapping == 0.5
    uncapped = copy.deepcopy(model)
    uncapped.config.final_logit_softcapping = None
    with torch.no_grad():
        assert not torch.allclose(uncapped(**inputs).loss, model(**inputs).loss, rtol=1e-3)
        logits = fused(input_ids=inputs["input_ids"]).logits
        assert_close(logits, model(input_ids=inputs["input_ids"]).logits, msg="Gemma 2 logits without labels")
        assert logits.abs().max() <= 0.5


# ----------------------------------------------------------------------------------------------
# The same Parameters, nothing copied.

def test_gated_mlp_keeps_parameter_objects():
    model = build("llama")
    mlp = model.model.layers[0].mlp
    params = {n: p for n, p in mlp.named_parameters()}
    fuse(model, inplace=True)
    assert {n: p for n, p in mlp.named_parameters()} == params
    assert list(mlp.state_dict()) == ["gate_proj.weight", "up_proj.weight", "down_proj.weight"]
    assert isinstance(mlp, tf.models.llama.modeling_llama.LlamaMLP)


def test_chunked_gated_mlp_keeps_parameter_objects():
    """Phi-3's MLP runs fused_mlp on its gate_up_proj weight as it is: the same Parameters, no copy."""
    model = build("phi3")
    mlp = model.model.layers[0].mlp
    params = {n: (p, p.data_ptr()) for n, p in mlp.named_parameters()}
    fuse(model, inplace=True)
    assert {n: (p, p.data_ptr()) for n, p in mlp.named_parameters()} == params
    assert list(mlp.state_dict()) == ["gate_up_proj.weight", "down_proj.weight"]


def _class_with_forward(base, name: str, body: str, path):
    """A subclass of `base` named `name` whose forward is `body`, written to a real source file
    (fuse() reads forward's source) at `path`, and named as a transformers module."""
    import importlib.util

    path.write_text(f"import torch\n\n\ndef forward(self, x):\n    {body}\n")
    spec = importlib.util.spec_from_file_location(path.stem, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    cls = type(name, (base,), {"forward": mod.forward})
    cls.__module__ = "transformers.models.fake.modeling_fake"
    return cls


class _ChunkedGated(nn.Module):
    """A library's gated MLP whose first Linear holds [gate; up]; `variant` picks its forward."""

    def __init__(self, act, bias=False, dropout=0.0):
        super().__init__()
        self.gate_up_proj = nn.Linear(8, 32, bias=bias)
        self.down_proj = nn.Linear(16, 8, bias=bias)
        self.act_fn = act
        self.drop = nn.Dropout(dropout)


_CHUNKED_GATED_FORWARDS = {
    # fused: Phi3MLP's own body, positional chunk arguments, the product inside the return
    "phi3": ("fused", "h = self.gate_up_proj(x)\n    gate, h = h.chunk(2, dim=-1)\n    h = h * self.act_fn(gate)\n"
                      "    return self.down_proj(h)"),
    "positional": ("fused", "h = self.gate_up_proj(x)\n    a, b = h.chunk(2, -1)\n    c = self.act_fn(a) * b\n"
                            "    return self.down_proj(c)"),
    "in_return": ("fused", "h = self.gate_up_proj(x)\n    a, b = h.chunk(2, dim=-1)\n"
                           "    return self.down_proj(self.act_fn(a) * b)"),
    # ModernBertMLP's: the chunk of the call itself, a dropout before down (p 0, or active: unfused then)
    "modernbert": ("fused", "a, b = self.gate_up_proj(x).chunk(2, dim=-1)\n"
                            "    return self.down_proj(self.drop(self.act_fn(a) * b))"),
    "dropout_active": ("fused", "a, b = self.gate_up_proj(x).chunk(2, dim=-1)\n"
                                "    return self.down_proj(self.drop(self.act_fn(a) * b))"),
    # left alone: [up; gate], split (not read as chunk), h read again, an extra statement
    "up_first": ("left", "h = self.gate_up_proj(x)\n    up, gate = h.chunk(2, dim=-1)\n"
                         "    return self.down_proj(up * self.act_fn(gate))"),
    "split": ("left", "h = self.gate_up_proj(x)\n    a, b = h.split(16, dim=-1)\n"
                      "    return self.down_proj(self.act_fn(a) * b)"),
    "h_again": ("left", "h = self.gate_up_proj(x)\n    a, b = h.chunk(2, dim=-1)\n    c = self.act_fn(a) * b\n"
                        "    return self.down_proj(c) + h.sum()"),
    "extra": ("left", "h = self.gate_up_proj(x)\n    a, b = h.chunk(2, dim=-1)\n    b = b * 2\n"
                      "    return self.down_proj(self.act_fn(a) * b)"),
}


@pytest.mark.parametrize("variant", list(_CHUNKED_GATED_FORWARDS))
@pytest.mark.parametrize("act", ["silu", "gelu_tanh"])
def test_chunked_gated_mlp_forms(variant, act, tmp_path):
    """fuse() takes the [gate; up] gated MLP in the forms that mean act(first half) * second half,
    and leaves every other form alone; either way the numbers are the module's own."""
    expect, body = _CHUNKED_GATED_FORWARDS[variant]
    cls = _class_with_forward(_ChunkedGated, f"ChunkedGated_{variant}", body, tmp_path / f"chunked_{variant}_{act}.py")
    activation = tf.activations.ACT2FN["silu" if act == "silu" else "gelu_pytorch_tanh"]
    torch.manual_seed(0)
    model = cls(activation, bias=act != "silu", dropout=0.5 if variant == "dropout_active" else 0.0)
    ref = copy.deepcopy(model)
    fused, report = fuse(model)
    kind = "swiglu" if act == "silu" else "geglu_tanh"
    replaced = [r for r in report.replaced if "gate_up_proj [gate; up], down_proj" in r]
    if expect == "fused":
        assert replaced and f"-> torch_ext.fused_mlp {kind}" in replaced[0], str(report)
        assert ("dropout self.drop" in replaced[0]) == ("self.drop(" in body), str(report)
    else:
        assert not report.replaced, str(report)
    x = torch.randn(3, 5, 8)
    xr = x.clone().requires_grad_()
    x.requires_grad_()
    torch.manual_seed(1)  # an active dropout: the fused module runs its own forward, the same draws
    y = fused(x)
    torch.manual_seed(1)
    yr = ref(xr)
    assert_close(y, yr, msg=variant)
    y.square().sum().backward()
    yr.square().sum().backward()
    assert_close(x.grad, xr.grad, msg=f"{variant}: input gradient")
    for (name, p), (_, pr) in zip(fused.named_parameters(), ref.named_parameters()):
        assert_close(p.grad, pr.grad, msg=f"{variant}: gradient of {name}")
    if variant == "dropout_active":  # in eval mode the fused path runs: the module's own numbers still
        fused.eval()
        ref.eval()
        with TorchExtOps() as calls:
            y = fused(x)
        assert any("mlp" in name for name in calls), calls
        assert_close(y, ref(x), msg=f"{variant}: eval")
        fused.train()
        with TorchExtOps() as calls:
            fused(x)
        assert not calls, calls  # training with p > 0: the module's own forward, as the report says


class _Gated(nn.Module):
    """A library's gated MLP with gate, up and down Linears; the test picks its forward."""

    def __init__(self):
        super().__init__()
        self.gate_proj, self.up_proj = nn.Linear(8, 16, bias=False), nn.Linear(8, 16, bias=False)
        self.down_proj = nn.Linear(16, 8, bias=False)
        self.act_fn = tf.activations.ACT2FN["silu"]


class _Holder(nn.Module):
    """Layers iterated as a decoder model does (with an optional argument, which fx cannot trace):
    fuse() reads the MLPs' own forwards (local.py)."""

    def __init__(self, mlp):
        super().__init__()
        self.layers = nn.ModuleList([mlp])

    def forward(self, x, mask=None):
        for layer in self.layers:
            x = layer(x)
        return x


_Holder.__module__ = "transformers.models.fake.modeling_fake"

_GATED_FORWARDS = {
    # fused: LlamaMLP's, its result named first, Llama 4's product named first (either order)
    "llama": ("fused", "return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))"),
    "named_result": ("fused", "h = self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))\n    return h"),
    "llama4": ("fused", "h = self.act_fn(self.gate_proj(x)) * self.up_proj(x)\n    return self.down_proj(h)"),
    "llama4_reversed": ("fused", "h = self.up_proj(x) * self.act_fn(self.gate_proj(x))\n    return self.down_proj(h)"),
    # left whole: the product read again, scaled before down, a dropout after down (Seed-OSS's)
    "h_again": ("left", "h = self.act_fn(self.gate_proj(x)) * self.up_proj(x)\n    return self.down_proj(h) + h.sum()"),
    "scaled": ("left", "h = self.act_fn(self.gate_proj(x)) * self.up_proj(x)\n    return self.down_proj(h * 2)"),
    "dropout_after": ("left", "h = self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))\n"
                              "    h = torch.nn.functional.dropout(h, p=0.0, training=self.training)\n    return h"),
}


@pytest.mark.parametrize("variant", list(_GATED_FORWARDS))
def test_gated_mlp_forms(variant, tmp_path):
    """fuse() replaces the forward of a gated MLP (gate, up, down Linears) in the forms that mean
    down(act(gate(x)) * up(x)), and no other; either way the numbers are the module's own."""
    expect, body = _GATED_FORWARDS[variant]
    cls = _class_with_forward(_Gated, f"Gated_{variant}", body, tmp_path / f"gated_{variant}.py")
    torch.manual_seed(0)
    model = _Holder(cls())
    ref = copy.deepcopy(model)
    fused, report = fuse(model)
    line = "gate_proj, up_proj, down_proj + SiLUActivation) -> torch_ext.fused_mlp swiglu"
    whole = [r for r in report.replaced if line in r]
    assert bool(whole) == (expect == "fused"), str(report)
    assert_same_outputs_and_grads(fused, ref, [torch.randn(3, 5, 8)], variant)


class _ChunkedFFN(nn.Module):
    """DistilBERT's FFN shape: forward hands its input to ff_chunk through transformers'
    apply_chunking_to_forward; `also_named` adds a method that names lin1 (other code might call it)."""

    def __init__(self):
        super().__init__()
        self.lin1 = nn.Linear(8, 16)
        self.activation = tf.activations.GELUActivation()
        self.lin2 = nn.Linear(16, 8)

    def forward(self, x):
        return tf.pytorch_utils.apply_chunking_to_forward(self.ff_chunk, 2, 1, x)

    def ff_chunk(self, x):
        h = self.lin1(x)
        h = self.activation(h)
        return self.lin2(h)


class _ChunkedFFNNamed(_ChunkedFFN):
    def first_layer(self):
        return self.lin1


class _ChunkedLayer(_ChunkedFFN):
    """ALBERT's layer shape: the chunked call among other statements of forward."""

    def forward(self, x):
        a = x * 2
        h = tf.pytorch_utils.apply_chunking_to_forward(self.ff_chunk, 2, 1, a)
        return h + a


class _ChunkedLayerOwnLinear(_ChunkedFFN):
    """Forward calls a Linear itself too: it is read as it is, ff_chunk not (lin1 left alone)."""

    def forward(self, x):
        h = tf.pytorch_utils.apply_chunking_to_forward(self.ff_chunk, 2, 1, x)
        return h + self.lin2(self.lin1(x) * 0)


for _cls in (_ChunkedFFN, _ChunkedFFNNamed, _ChunkedLayer, _ChunkedLayerOwnLinear):
    _cls.__module__ = "transformers.models.fake.modeling_fake"


@pytest.mark.parametrize("cls", [_ChunkedFFN, _ChunkedFFNNamed, _ChunkedLayer, _ChunkedLayerOwnLinear],
                         ids=["alone", "named_elsewhere", "among_other_statements", "forward_calls_a_linear"])
def test_pairs_in_the_method_forward_hands_to_apply_chunking(cls):
    """The pair in ff_chunk becomes a FusedLinear, chunked over the sequence as before; left alone
    where another method names the Linear. The same numbers either way."""
    torch.manual_seed(0)
    model = cls()
    ref = copy.deepcopy(model)
    fused, report = fuse(model)
    if cls in (_ChunkedFFN, _ChunkedLayer):
        assert type(fused.lin1) is FusedLinear and type(fused.activation) is nn.Identity, str(report)
        assert any(f"(in {cls.__name__}.ff_chunk, rewritten on its own)" in r for r in report.replaced), str(report)
    else:
        assert type(fused.lin1) is nn.Linear and not report.replaced, str(report)
        if cls is _ChunkedFFNNamed:
            assert any("first_layer names 'lin1'" in s for s in report.skipped), str(report)
    x = torch.randn(3, 4, 8, requires_grad=True)
    xr = x.detach().clone().requires_grad_()
    y, yr = fused(x), ref(xr)
    assert_close(y, yr)
    y.square().sum().backward()
    yr.square().sum().backward()
    assert_close(x.grad, xr.grad)


def test_conv1d_weight_is_not_copied():
    """GPT-2's MLP runs fused_mlp on its Conv1D weights' transposed views: the same Parameters."""
    model = build("gpt2")
    mlp = model.transformer.h[0].mlp
    params = {n: (p, p.data_ptr()) for n, p in mlp.named_parameters()}
    fuse(model, inplace=True)
    assert {n: (p, p.data_ptr()) for n, p in mlp.named_parameters()} == params
    assert mlp.c_fc.weight.shape == (32, 128)


class ConvAct(nn.Module):
    """openai-gpt's shape: act(c_fc(x)) nested, then c_proj: the pair becomes a FusedConv1D."""

    def __init__(self):
        super().__init__()
        self.c_fc = tf.pytorch_utils.Conv1D(16, 8)
        self.act = tf.activations.NewGELUActivation()
        self.c_proj = tf.pytorch_utils.Conv1D(8, 16)

    def forward(self, x, scale=None):
        h = self.act(self.c_fc(x))
        return self.c_proj(h)


ConvAct.__module__ = "transformers.models.fake.modeling_fake"


def test_conv1d_followed_by_activation_becomes_fused_conv1d():
    model = ConvAct()
    weight, ptr = model.c_fc.weight, model.c_fc.weight.data_ptr()
    ref = copy.deepcopy(model)
    fused, report = fuse(model, inplace=True)
    new = fused.c_fc
    assert type(new).__name__ == "FusedConv1D" and isinstance(new, tf.pytorch_utils.Conv1D), str(report)
    assert new.weight is weight and new.weight.data_ptr() == ptr
    assert type(fused.act) is nn.Identity
    assert any("c_proj (Conv1D 16->8)" in s and "does not pass its output" in s for s in report.skipped), str(report)
    x = torch.randn(3, 5, 8, requires_grad=True)
    y, y_ref = fused(x), ref(x)
    assert_close(y, y_ref)
    g = torch.randn_like(y)
    for a, b in zip(torch.autograd.grad(y, [x, *fused.parameters()], g),
                    torch.autograd.grad(y_ref, [x, *ref.parameters()], g)):
        assert_close(a, b)
    assert list(fused.state_dict()) == list(ref.state_dict())


# ----------------------------------------------------------------------------------------------
# What fuse() must refuse, and says why.

# What each ACT2FN entry is fused as (None: left alone), as measured with transformers 5.x.
ACT2FN_EXPECTED = {
    "gelu": "gelu", "gelu_python": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_python_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh", "gelu_accurate": "gelu_tanh", "silu": "silu",
    "swish": "silu", "relu": "relu", "sigmoid": "sigmoid", "tanh": "tanh", "leaky_relu": "leaky_relu",
    "quick_gelu": "quick_gelu", "gelu_10": None, "mish": None, "relu2": None, "relu6": None, "linear": None,
    "laplace": None,
}


@pytest.mark.parametrize("name", sorted(ACT2FN_EXPECTED))
def test_act2fn_entries(name):
    from transformers.activations import ACT2FN

    act = ACT2FN[name]
    model = Block(act)
    fused, report = fuse(model)
    expected = ACT2FN_EXPECTED[name]
    got = fused.fc.activation if isinstance(fused.fc, FusedLinear) else None
    assert got == expected, str(report)
    x = torch.randn(4, 8) * 3
    assert_close(fused(x), model(x))


def _fake_activation(name: str, formula, module="transformers.activations"):
    cls = type(name, (nn.Module,), {"forward": lambda self, x: formula(x)})
    cls.__module__ = module  # what fuse() goes by, with the numerical check
    return cls


class Block(nn.Module):
    """A module of transformers' kind (its class's module says transformers) with a Linear -> act."""

    def __init__(self, act):
        super().__init__()
        self.fc = nn.Linear(8, 16)
        self.act = act
        self.out = nn.Linear(16, 8)

    def forward(self, x, scale=None):  # the optional argument keeps the fx path off
        return self.out(self.act(self.fc(x)))


Block.__module__ = "transformers.models.fake.modeling_fake"


@pytest.mark.parametrize("name, formula, fused_as, module", [
    ("NewGELUActivation", lambda x: 0.5 * x * (1.0 + torch.tanh(0.7978845608028654 * (x + 0.044715 * x ** 3))),
     "gelu_tanh", "transformers.activations"),
    ("NewGELUActivation", lambda x: 0.5 * x * (1.0 + torch.tanh(0.7978845608028654 * (x + 0.05 * x ** 3))),
     None, "transformers.activations"),
    ("GELUActivation", lambda x: x * torch.sigmoid(1.702 * x), None, "transformers.activations"),  # quick_gelu as gelu
    ("QuickGELUActivation", lambda x: x * torch.sigmoid(1.702 * x), "quick_gelu", "transformers.activations"),
    ("QuickGELUActivation", lambda x: x * torch.sigmoid(1.7 * x), None, "transformers.activations"),
    ("QuickGELU", lambda x: x * torch.sigmoid(1.702 * x), "quick_gelu", "timm.layers.activations"),
    ("QuickGELU", lambda x: x * torch.sigmoid(1.702 * x), "quick_gelu", "open_clip.transformer"),
    ("QuickGELU", lambda x: x * torch.sigmoid(1.7 * x), None, "open_clip.transformer"),
    ("SiLUActivation", lambda x: x * torch.sigmoid(x), "silu", "transformers.activations"),
    ("SiLUActivation", lambda x: x * torch.sigmoid(x) * 1.001, None, "transformers.activations"),
    ("GELUTanh", lambda x: torch.nn.functional.gelu(x, approximate="tanh"), "gelu_tanh", "timm.layers.activations"),
    ("Swish", lambda x: x * torch.sigmoid(x), "silu", "timm.layers.activations"),
    # not exact gelu
    ("GELU", lambda x: torch.nn.functional.gelu(x, approximate="tanh"), None, "timm.layers.activations"),
    ("NoSuchActivation", lambda x: torch.relu(x), None, "transformers.activations"),  # unknown name
])
def test_library_activation_needs_its_formula(name, formula, fused_as, module):
    model = Block(_fake_activation(name, formula, module)())
    fused, report = fuse(model)
    if fused_as is None:
        assert type(fused.fc) is nn.Linear, str(report)
        assert any("fc (Linear 8->16)" in s for s in report.skipped), str(report)
    else:
        assert type(fused.fc) is FusedLinear and fused.fc.activation == fused_as, str(report)
        assert type(fused.act) is nn.Identity
    x = torch.randn(4, 8, requires_grad=True)
    assert_close(fused(x), model(x))


@pytest.mark.parametrize("scale, fused_as", [(1.702, "quick_gelu"), (1.7, None)], ids=["quick_gelu", "other_formula"])
@pytest.mark.parametrize("form", ["sequential", "traced_forward"])
def test_open_clip_residual_block_mlp(form, scale, fused_as):
    """open_clip's ResidualAttentionBlock MLP, nn.Sequential(c_fc, QuickGELU, c_proj) as in the
    models of OpenAI's CLIP weights (or the same in a forward fuse() traces), in a residual block:
    c_fc becomes a FusedLinear quick_gelu, the same numbers; a QuickGELU of another formula stays."""
    quick_gelu = _fake_activation("QuickGELU", lambda x: x * torch.sigmoid(scale * x), "open_clip.transformer")

    class Mlp(nn.Module):
        def __init__(self):
            super().__init__()
            self.c_fc, self.gelu, self.c_proj = nn.Linear(8, 32), quick_gelu(), nn.Linear(32, 8)

        def forward(self, x):
            return self.c_proj(self.gelu(self.c_fc(x)))

    class ResidualBlock(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln_2 = nn.LayerNorm(8)
            self.mlp = Mlp() if form == "traced_forward" else nn.Sequential(OrderedDict(
                [("c_fc", nn.Linear(8, 32)), ("gelu", quick_gelu()), ("c_proj", nn.Linear(32, 8))]))

        def forward(self, x):
            return x + self.mlp(self.ln_2(x))

    torch.manual_seed(0)
    model = nn.Sequential(ResidualBlock(), ResidualBlock())
    fused, report = fuse(copy.deepcopy(model))
    for i, block in enumerate(fused):
        if fused_as is None:
            assert type(block.mlp.c_fc) is nn.Linear and type(block.mlp.gelu) is not nn.Identity, str(report)
            assert any(f"{i}.mlp.c_fc (Linear 8->32)" in line for line in report.skipped), str(report)
        else:
            assert type(block.mlp.c_fc) is FusedLinear and block.mlp.c_fc.activation == fused_as, str(report)
            assert f"{i}.mlp.c_fc (Linear 8->32) + quick_gelu -> FusedLinear" in report.replaced, str(report)
            # (a traced forward drops the activation's call; a Sequential's slot becomes Identity)
            assert form == "traced_forward" or type(block.mlp.gelu) is nn.Identity, str(report)
    assert_same_outputs_and_grads(fused, model, [torch.randn(3, 5, 8)], f"{form}, {fused_as}")


def test_linear_named_by_code_above_is_left_alone():
    """A module above the MLP calls one of its Linears itself: the MLP is not rewritten."""

    class Outer(nn.Module):
        def __init__(self):
            super().__init__()
            self.mlp = Block(nn.GELU())

        def forward(self, x, extra=None):
            return self.mlp(x) + self.mlp.fc(x)[..., :8]

    model = Outer()
    fused, report = fuse(model)
    assert type(fused.mlp.fc) is nn.Linear and type(fused.mlp.act) is nn.GELU
    assert any("mlp.fc (Linear 8->16)" in s and "names 'fc'" in s for s in report.skipped), str(report)
    x = torch.randn(3, 8)
    assert_close(fused(x), model(x))


def test_mlp_edited_in_its_forward_while_code_above_names_its_linears():
    """An MLP whose forward is three statements (fc1, act, fc2) is edited in place (fused_mlp in
    its forward), with its modules kept: a module above that calls or initializes its Linears
    itself (CLIP's _init_weights names fc1 and fc2) still finds them as they were."""

    class SeqMLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.act, self.fc2 = nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8)

        def forward(self, x):
            h = self.fc1(x)
            h = self.act(h)
            h = self.fc2(h)
            return h

    class Outer(nn.Module):
        def __init__(self):
            super().__init__()
            self.mlp = SeqMLP()

        def reset(self):
            nn.init.zeros_(self.mlp.fc2.bias)

        def forward(self, x, extra=None):
            return self.mlp(x) + self.mlp.fc1(x)[..., :8]

    model = Outer()
    fused, report = fuse(model)
    assert any("mlp (SeqMLP: fc1, fc2 + GELU) -> torch_ext.fused_mlp gelu (in its forward)" in r
               for r in report.replaced), str(report)
    assert type(fused.mlp.fc1) is nn.Linear and type(fused.mlp).forward is not SeqMLP.forward
    assert_same_outputs_and_grads(fused, model, [torch.randn(3, 8)], "SeqMLP named above")
    fused.reset()
    assert not fused.mlp.fc2.bias.any()


def _pretrained_with_sequential(helper_calls_layer: bool):
    """A transformers PreTrainedModel holding an nn.Sequential(Linear, GELU, Linear), whose
    _init_weights calls super()'s (transformers' own, as every model's does); with
    `helper_calls_layer`, the model overrides a helper of a model-specific base class (which calls
    the Sequential's first Linear itself) and reaches it through super()."""

    class FakeConfig(tf.PretrainedConfig):
        model_type = "torch_ext_fake_sequential"

    class FakeModel(tf.PreTrainedModel):
        config_class = FakeConfig

        def __init__(self, config):
            super().__init__(config)
            self.proj = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8))
            self.post_init()

        def _init_weights(self, module):
            super()._init_weights(module)

        def forward(self, x):
            return self.proj(x)

    class WithHelper(FakeModel):
        def helper(self, x):
            return self.proj[0](x)

    class OverridingHelper(WithHelper):
        def helper(self, x):
            return super().helper(x)

    for cls in (FakeConfig, FakeModel, WithHelper, OverridingHelper):
        cls.__module__ = "transformers.models.fake.modeling_fake"
    torch.manual_seed(0)
    return (OverridingHelper if helper_calls_layer else FakeModel)(FakeConfig())


@pytest.mark.parametrize("helper_calls_layer", [False, True], ids=["framework_code_only", "base_helper_calls_it"])
def test_sequential_inside_a_pretrained_model(helper_calls_layer):
    # transformers' own base classes (PreTrainedModel and its mixins) pass self to helpers and
    # find modules by names from configs, but call no layer on data: fuse() does not read them, and
    # a super() call that reaches them (every _init_weights) hides nothing. Before, every
    # nn.Sequential in a transformers model (Qwen2-VL's patch merger, SAM's MLPs) was left alone as
    # "may call it directly (code fuse() cannot read)". A super() call that reaches the model's
    # own base class code, which fuse() does not read there, still blocks.
    model = _pretrained_with_sequential(helper_calls_layer)
    fused, report = fuse(model)
    if helper_calls_layer:
        assert type(fused.proj[0]) is nn.Linear, str(report)
        assert any("proj.0 (Linear 8->16)" in s and "may call it directly" in s for s in report.skipped), str(report)
    else:
        assert type(fused.proj[0]) is FusedLinear and fused.proj[0].activation == "gelu", str(report)
        assert type(fused.proj[1]) is nn.Identity
    assert_same_outputs_and_grads(fused, model, [torch.randn(3, 8)], f"helper_calls_layer={helper_calls_layer}")


class _LinearVariantMlp(nn.Module):
    """fc1 -> act -> fc2 statements on an nn.Linear subclass named FalconLinear (`scale`: its forward
    multiplies F.linear's result, as a changed formula would)."""

    def __init__(self, scale: float):
        super().__init__()

        class FalconLinear(nn.Linear):
            def forward(self, input):
                out = input @ self.weight.T
                return (out if self.bias is None else out + self.bias) * scale

        FalconLinear.__module__ = "transformers.models.falcon.modeling_fake"
        self.fc1, self.act, self.fc2 = FalconLinear(8, 16), nn.GELU(), FalconLinear(16, 8)

    def forward(self, x):
        h = self.fc1(x)
        h = self.act(h)
        y = self.fc2(h)
        return y


_LinearVariantMlp.__module__ = "transformers.models.falcon.modeling_fake"


@pytest.mark.parametrize("scale", [1.0, 2.0], ids=["linear", "changed_formula"])
def test_falcon_linear_taken_only_when_it_computes_linear(scale):
    # FalconLinear (F.linear written out) is taken as a Linear: fc1 + act becomes a FusedLinear
    # holding its Parameters (not fused_mlp, whose layer checks take exact nn.Linear); a class of
    # that name whose forward computes something else stays, as the report says.
    torch.manual_seed(0)
    model = _Holder(_LinearVariantMlp(scale))
    ref = copy.deepcopy(model)
    weight = model.layers[0].fc1.weight
    fused, report = fuse(model, inplace=True)
    mlp = fused.layers[0]
    if scale == 1.0:
        assert type(mlp.fc1) is FusedLinear and mlp.fc1.activation == "gelu", str(report)
        assert mlp.fc1.weight is weight  # the same Parameter object
        assert type(mlp.fc2).__name__ == "FalconLinear" and type(mlp.act) is nn.Identity
    else:
        assert type(mlp.fc1).__name__ == "FalconLinear" and not report.replaced, str(report)
        assert any("a subclass of nn.Linear" in line for line in report.skipped), str(report)
    assert_same_outputs_and_grads(fused, ref, [torch.randn(3, 8)], f"scale={scale}")


def test_unreadable_source_above_is_left_alone():
    """A module above the MLP has a method whose source cannot be read: fuse() cannot tell
    whether it calls the Linear, so it leaves the MLP alone and says so."""

    class Outer(nn.Module):
        def __init__(self):
            super().__init__()
            self.mlp = Block(nn.GELU())

        def forward(self, x, extra=None):
            return self.mlp(x)

    scope = {}
    exec("def helper(self, x):\n    return self.mlp.out(x)\n", scope)  # no file: no source
    Outer.helper = scope["helper"]
    model = Outer()
    fused, report = fuse(model)
    assert type(fused.mlp.fc) is nn.Linear, str(report)
    assert any("mlp.fc (Linear 8->16)" in s and "Outer.helper is not available" in s
               for s in report.skipped), str(report)


def test_activation_used_elsewhere_is_kept():
    """The activation module also serves a call fuse() does not fuse: neither is rewritten."""

    class TwoUses(Block):
        def forward(self, x, scale=None):
            return self.out(self.act(self.fc(x))) + self.act(x)

    TwoUses.__module__ = Block.__module__
    model = TwoUses(nn.GELU())
    fused, report = fuse(model)
    assert type(fused.fc) is nn.Linear and type(fused.act) is nn.GELU, str(report)
    x = torch.randn(3, 8)
    assert_close(fused(x), model(x))


@pytest.mark.skipif(not hasattr(nn, "LinearCrossEntropyLoss"), reason="PyTorch without nn.LinearCrossEntropyLoss")
def test_linear_cross_entropy_loss_module():
    loss = nn.LinearCrossEntropyLoss(8, 10, bias=True, ignore_index=-1, label_smoothing=0.1,
                                     weight=torch.rand(10) + 0.5)
    fused, report = fuse(loss)  # a copy: equal values, its own Parameters
    assert isinstance(fused, torch_ext.LinearCrossEntropyLoss), str(report)
    assert fused.state_dict().keys() == loss.state_dict().keys()
    x, t = torch.randn(6, 8, requires_grad=True), torch.tensor([1, 2, -1, 3, 9, 0])
    assert_close(fused(x, t), loss(x, t))

    class Head(nn.Module):
        def __init__(self):
            super().__init__()
            self.criterion = loss

        def forward(self, x, t):
            return self.criterion(x, t)

    model = Head()
    fuse(model, inplace=True)  # in place: the same Linear (Parameters) and class weights
    assert isinstance(model.criterion, torch_ext.LinearCrossEntropyLoss)
    assert model.criterion.linear is loss.linear and model.criterion.weight is loss.weight
    (got,) = torch.autograd.grad(model(x, t), x)
    (want,) = torch.autograd.grad(loss(x, t), x)
    assert_close(got, want)


@pytest.mark.cpu_only("a subprocess, no tensors on a device")
def test_torch_ext_imports_without_transformers():
    code = (
        "import sys; sys.modules['transformers'] = None\n"
        "import torch, torch_ext\n"
        "m = torch_ext.fuse(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.GELU()))\n"
        "assert type(m[0]).__name__ == 'FusedLinear'\n"
        "assert 'torch_ext.integrations.transformers' not in sys.modules\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
