"""Standard tooling on CAT: torch.export with attention masks (static and dynamic shapes) and dynamic int8
quantisation, both of which need the blocks' projections to be plain linear layers."""

from __future__ import annotations

import collections

import torch
from torch import nn

from cat_hf import CATConfig, CATForAudioClassification, CATModel


def tiny_config(**overrides) -> CATConfig:
    base = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_mel_bins=32, stem_channels=[8, 16],
                stem_depths=[1, 1], max_time_patches=64, decoder_groups=8, rr_embedding_dim=None, num_labels=3)
    return CATConfig(**{**base, **overrides})


def padded_batch(batch: int, frames: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Features and a frame mask whose first row is right-padded (half its frames real)."""
    generator = torch.Generator().manual_seed(seed)
    mask = torch.ones(batch, frames, dtype=torch.long)
    mask[0, frames // 2:] = 0
    return torch.randn(batch, frames, 32, generator=generator), mask


def call_counts(program: torch.export.ExportedProgram) -> collections.Counter:
    return collections.Counter(str(node.target) for node in program.graph.nodes if node.op == "call_function")


def test_static_export_with_mask_matches_eager_and_shows_linear_layers():
    torch.manual_seed(0)
    model = CATModel(tiny_config()).eval()
    x, mask = padded_batch(2, 64)
    program = torch.export.export(model, (), {"input_values": x, "attention_mask": mask})
    with torch.no_grad():
        exported = program.module()(input_values=x, attention_mask=mask)
        eager = model(x, attention_mask=mask)
    torch.testing.assert_close(exported.last_hidden_state, eager.last_hidden_state, atol=1e-4, rtol=0)
    torch.testing.assert_close(exported.pooler_output, eager.pooler_output, atol=1e-4, rtol=0)
    # Every nn.Linear is an aten.linear node; the convolutions are the stem's own, none stands in for a linear layer.
    counts = call_counts(program)
    linears = sum(isinstance(m, nn.Linear) for m in model.modules())
    convolutions = sum(isinstance(m, nn.Conv2d) for m in model.modules())
    assert linears == 6 * 2 + 1  # q, k, v, o, fc1, fc2 per block + the stem's token projection
    assert counts["aten.linear.default"] == linears
    assert counts["aten.conv2d.default"] == convolutions


def test_dynamic_export_with_mask_serves_other_batch_sizes_and_lengths():
    """Batch and time dynamic (Dim.AUTO): one program serves lengths that are no multiple of a patch, and padded
    rows, matching eager within 1e-4. Lengths in whole patches also export with an explicit 16 * Dim."""
    torch.manual_seed(0)
    model = CATForAudioClassification(tiny_config()).eval()
    x, mask = padded_batch(2, 64)
    auto = torch.export.Dim.AUTO
    program = torch.export.export(
        model, (), {"input_values": x, "attention_mask": mask},
        dynamic_shapes={"input_values": {0: auto, 1: auto}, "attention_mask": {0: auto, 1: auto}},
    )
    for batch, frames in ((3, 100), (5, 301), (2, 1024)):
        y, y_mask = padded_batch(batch, frames, seed=frames)
        with torch.no_grad():
            torch.testing.assert_close(program.module()(input_values=y, attention_mask=y_mask).logits,
                                       model(y, attention_mask=y_mask).logits, atol=1e-4, rtol=0)

    patches = torch.export.Dim("patches", min=2, max=64)
    batch_dim = torch.export.Dim("batch", min=1, max=16)
    shapes = {"input_values": {0: batch_dim, 1: 16 * patches}, "attention_mask": {0: batch_dim, 1: 16 * patches}}
    program = torch.export.export(model.cat, (), {"input_values": x, "attention_mask": mask}, dynamic_shapes=shapes)
    y, y_mask = padded_batch(4, 160, seed=1)
    with torch.no_grad():
        torch.testing.assert_close(program.module()(input_values=y, attention_mask=y_mask).last_hidden_state,
                                   model.cat(y, attention_mask=y_mask).last_hidden_state, atol=1e-4, rtol=0)


def test_dynamic_int8_quantisation_reaches_every_linear_layer():
    torch.manual_seed(0)
    model = CATForAudioClassification(tiny_config()).eval()
    linear_names = {name for name, module in model.named_modules() if isinstance(module, nn.Linear)}
    quantised = torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)
    dynamic_linear = torch.ao.nn.quantized.dynamic.Linear
    assert {name for name, m in quantised.named_modules() if isinstance(m, dynamic_linear)} == linear_names
    assert {"cat.layers.0.attention.q_proj", "cat.layers.1.mlp.fc2", "classifier"} <= linear_names
    x, mask = padded_batch(2, 96)
    with torch.no_grad():
        reference, int8 = model(x, attention_mask=mask).logits, quantised(x, attention_mask=mask).logits
    assert not torch.equal(reference, int8)  # the int8 kernels ran
    assert torch.nn.functional.cosine_similarity(reference, int8, dim=-1).min() > 0.99


def test_fast_cpu_path_defers_to_the_module_whenever_tooling_could_see_it():
    """The blocks compute plain nn.Linear layers through oneDNN on CPU, but a layer with a hook (or replaced, as
    quantisation and LoRA do) runs its own forward; both give the same numbers."""
    torch.manual_seed(0)
    model = CATModel(tiny_config()).eval()
    x, mask = padded_batch(2, 96)
    with torch.no_grad():
        fast = model(x, attention_mask=mask).last_hidden_state
    calls = []
    handles = [m.register_forward_hook(lambda *_: calls.append(1)) for m in model.modules() if isinstance(m, nn.Linear)]
    with torch.no_grad():
        hooked = model(x, attention_mask=mask).last_hidden_state
    for handle in handles:
        handle.remove()
    assert len(calls) == len(handles) == 13  # every linear layer ran its module, hooks included
    torch.testing.assert_close(hooked, fast, atol=1e-5, rtol=0)
