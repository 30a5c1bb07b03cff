"""Finding a reference's fused projections split in its port (``reprod.align.fusion.model_splits``,
run by every ``align_forward`` and ``align_train``) against its floors, on a real pair: Hugging
Face's Phi-3 against PaddleNLP's LLaMA (tests/realworld/test_split_ports_real.py), at hidden
1024, 8 layers, 16 heads (4 key-value), vocabulary 8000: about 100M parameters, 16 fused tensors.
And the forward direction (``model_fusions``): Hugging Face's LLaMA against PaddleNLP's with
``fuse_attention_qkv`` and ``fuse_attention_ffn``, the same config.

    OMP_NUM_THREADS=1 .venv-real/bin/python benchmarks/splits.py
    OMP_NUM_THREADS=1 .venv-real/bin/python benchmarks/splits.py --reprod DIR   # another checkout

Against, measured in the same run: the plain computation, one ``np.array_equal`` of every fused
tensor against a copy of it in Paddle's layout (its transpose, as the port's parts hold the
values: each byte compared read once a side, what telling the layout from the values needs),
and one forward pass of the reference at 2 x 64 tokens (the least an ``align_forward`` runs
besides). Medians of ``--rounds``.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

from _realmodels import median_seconds, revision, use_checkout

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
CONFIG = dict(vocab_size=8000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
              num_attention_heads=16, num_key_value_heads=4, max_position_embeddings=64,
              rms_norm_eps=1e-6)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--reprod", default=ROOT, help="the checkout measured (default: this one)")
    args = parser.parse_args()
    use_checkout(args.reprod)
    warnings.simplefilter("ignore")
    try:
        import numpy as np
        import paddle
        import paddlenlp.transformers as pnlp
        import torch
        import transformers
    except ImportError as exc:
        raise SystemExit(f"splits.py needs transformers and paddlenlp ({exc}): run it with the "
                         "real-model environment, .venv-real/bin/python benchmarks/splits.py") from None

    from reprod.align import load_into_paddle
    from reprod.align.fusion import model_splits

    torch.manual_seed(0)
    tm = transformers.Phi3Model(transformers.Phi3Config(
        **CONFIG, pad_token_id=None, attn_implementation="eager")).eval()
    paddle.seed(0)
    pm = pnlp.LlamaModel(pnlp.LlamaConfig(**CONFIG))
    pm.eval()
    load_into_paddle(pm, tm)
    splits = model_splits(tm, pm)
    assert len(splits) == 2 * CONFIG["num_hidden_layers"] and not any(s.stray for s in splits)
    sd = tm.state_dict()
    fused = [sd[s.torch_key].numpy() for s in splits]
    copies = [np.ascontiguousarray(a.T) for a in fused]  # Paddle's layout, as the parts are
    ids = torch.randint(1, CONFIG["vocab_size"], (2, 64), generator=torch.Generator().manual_seed(0))

    def forward() -> None:
        with torch.no_grad():
            tm(ids)

    found = median_seconds(lambda: model_splits(tm, pm), args.rounds)
    read = median_seconds(lambda: [np.array_equal(a, b.T) for a, b in zip(fused, copies)],
                          args.rounds)
    fwd = median_seconds(forward, args.rounds)
    n = sum(p.numel() for p in tm.parameters())
    size = sum(a.nbytes for a in fused)
    # the forward direction: HF's LLaMA against PaddleNLP's fused one (model_fusions)
    from reprod.align import ConversionRules
    from reprod.align.fusion import model_fusions

    torch.manual_seed(0)
    llama = transformers.LlamaModel(transformers.LlamaConfig(
        **CONFIG, attn_implementation="eager")).eval()
    fused_port = pnlp.LlamaModel(pnlp.LlamaConfig(**CONFIG, fuse_attention_qkv=True,
                                                  fuse_attention_ffn=True))
    fused_port.eval()
    rules = ConversionRules(fuse_groups={"qkv_proj": CONFIG["num_key_value_heads"]})
    load_into_paddle(fused_port, llama, rules=rules)
    fusions = model_fusions(llama, fused_port, rules)
    assert len(fusions) == 2 * CONFIG["num_hidden_layers"]
    port_fused = [fused_port.state_dict()[f.port_key].numpy() for f, _ in fusions]
    port_copies = [np.ascontiguousarray(a.T) for a in port_fused]
    found_f = median_seconds(lambda: model_fusions(llama, fused_port, rules), args.rounds)
    read_f = median_seconds(
        lambda: [np.array_equal(a, b.T) for a, b in zip(port_fused, port_copies)], args.rounds)

    print(f"reprod {revision(args.reprod)}; Phi-3 {n / 1e6:.0f}M parameters, {len(splits)} fused "
          f"tensors ({size / 2**20:.0f} MiB), torch {torch.__version__}, paddle "
          f"{paddle.__version__}, median of {args.rounds}")
    print("| what | seconds | x the plain comparison | x one forward |")
    print("|---|---|---|---|")
    for name, t in (("model_splits", found),
                    ("plain: array_equal of each fused tensor and its transpose", read),
                    ("one forward, 2 x 64 tokens", fwd)):
        print(f"| {name} | {t:.3f} | {t / read:.1f} | {t / fwd:.2f} |")
    print(f"| model_fusions, HF's LLaMA against PaddleNLP's fused one | {found_f:.3f} | "
          f"{found_f / read_f:.1f} (of {read_f:.3f}) | {found_f / fwd:.2f} |")


if __name__ == "__main__":
    sys.path.insert(0, HERE)
    main()
