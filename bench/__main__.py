"""lmtune benchmarks (issue 5). See bench/README.md.

    python -m bench throughput --data sst2 --rows 2000 --steps 40 --repeats 3
    python -m bench throughput --data ag_news --rows 2000 --steps 20 --repeats 3 --max-length 128
    python -m bench mfu --data ag_news --steps 20
    python -m bench search --data sst2 --budget 30m --seeds 0,1       # lmtune tune (TPE, random) vs Trainer.hyperparameter_search
    python -m bench search --data e2e_nlg --budget 30m --seeds 0,1    # the same on generation (validation loss)
    python -m bench search --tiny                                     # its code paths on a tiny random model (< 1 min)
    python -m bench quality --rows 2000
    python -m bench all --quick
    python -m bench gpu --out bench/results          # CUDA: lmtune vs Trainer (best GPU flags), a tiny study; --tiny on CPU
    python -m bench sft                              # generation: lmtune vs TRL SFTTrainer on E2E, decoding vs model.generate
    python -m bench metric-choice                    # generation: does val_loss pick the checkpoints and trials ROUGE-L/BLEU pick?
    python -m bench labels-as-words                  # SST-2 with the labels written as words (generation) vs the classification head
    python -m bench guide                            # docs/key-parameters.md from the studies in bench/results (--check, --recompute)
    python -m bench tpe-replay RESULT.json           # a search benchmark's TPE proposals replayed: why it proposed what it did
"""

from __future__ import annotations

import argparse
import sys
import time


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] in (["sft"], ["gpu"]) and argv[1:2] and argv[1].startswith("_"):  # their own verbs: sft _pool, gpu _assets, ...
        from importlib import import_module
        return import_module(f"bench.{argv[0]}").main(argv[1:])
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("throughput", help="lmtune vs Trainer (defaults, best flags): speed, memory, accuracy, MFU")
    t.add_argument("--data", default="sst2")
    t.add_argument("--rows", type=int, default=2000)
    t.add_argument("--steps", type=int, default=40)
    t.add_argument("--repeats", type=int, default=3)
    t.add_argument("--max-length", type=int)
    t.add_argument("--val-rows", type=int, help="default: the whole validation file, or 500 rows of a held-out split")
    t.add_argument("--threads", type=int, help="torch threads in every contender (default: torch's default)")
    t.add_argument("--contenders", default="lmtune,trainer-best,trainer-default",
                   help="comma-separated; also lmtune-autocast, lmtune-autocast-sdpa, trainer-best-eager (ablations)")
    t.add_argument("--name", help="result file name (default: throughput-DATA)")
    m = sub.add_parser("mfu", help="lmtune only: model FLOPs utilisation vs the torch.matmul peak, optimizer share")
    m.add_argument("--data", default="ag_news")
    m.add_argument("--rows", type=int, default=2000)
    m.add_argument("--steps", type=int, default=20)
    m.add_argument("--repeats", type=int, default=3)
    m.add_argument("--max-length", type=int)
    m.add_argument("--threads", type=int)
    from bench import search as search_bench
    s = sub.add_parser("search", help="lmtune tune (TPE, random, warm start) vs Trainer.hyperparameter_search: same space, "
                                      "data and budget per sampler seed; best-so-far curves, confirmed means, time to "
                                      "the Trainer's best", description=search_bench.__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    search_bench.add_arguments(s)
    q = sub.add_parser("quality", help="test accuracy vs TF-IDF + logistic regression and published references")
    q.add_argument("--rows", type=int, default=2000)
    q.add_argument("--data", default="sst2,ag_news,trec")
    q.add_argument("--epochs", type=int, default=1)
    q.add_argument("--test-rows", type=int, default=2000)
    a = sub.add_parser("all", help="every benchmark; --quick: the smallest setting (< 15 min on 2 idle cores)")
    a.add_argument("--quick", action="store_true")
    from bench import gpu
    g = sub.add_parser("gpu", help="CUDA: both tasks in bf16 vs Trainer's best GPU flags, decoding, a tiny study (--tiny: CPU)")
    gpu.add_arguments(g)
    from bench import sft
    f = sub.add_parser("sft", help="generation: lmtune vs TRL SFTTrainer on E2E (speed, memory, val loss, BLEU/ROUGE-L), "
                                   "lmtune's decoding vs a plain model.generate loop")
    sft.add_arguments(f)
    from bench import metric_choice
    c = sub.add_parser("metric-choice", help="generation: does validation loss pick the checkpoints and trials that "
                                             "ROUGE-L and BLEU pick, within seed noise, and what decoding costs",
                       description=metric_choice.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    metric_choice.add_arguments(c)
    from bench import labels_as_words
    w = sub.add_parser("labels-as-words", help="SST-2 as generation (labels as words) vs the classification head: "
                                               "test accuracy and time on the same rows",
                       description=labels_as_words.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    labels_as_words.add_arguments(w)
    from bench import guide
    gd = sub.add_parser("guide", help="rewrite docs/key-parameters.md from the studies in bench/results (--check: compare)",
                        description=guide.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    guide.add_arguments(gd)
    from bench import tpe_replay
    tr = sub.add_parser("tpe-replay", help="replay a search benchmark's TPE proposals from its result file, and show "
                                           "them what it saw in other ways (pruned trials hidden, GP)",
                        description=tpe_replay.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    tpe_replay.add_arguments(tr)
    ns = p.parse_args(argv)

    if ns.cmd == "gpu":
        return gpu.run(ns)
    if ns.cmd == "sft":
        sft.run(ns)
        return 0
    if ns.cmd == "metric-choice":
        metric_choice.run(ns)
        return 0
    if ns.cmd == "labels-as-words":
        labels_as_words.run(ns)
        return 0
    if ns.cmd == "guide":
        return guide.run(ns)
    if ns.cmd == "tpe-replay":
        return tpe_replay.run(ns)
    from bench import quality, search, throughput
    if ns.cmd == "throughput":
        throughput.run(ns.data, ns.rows, ns.steps, ns.repeats, max_length=ns.max_length, val_rows=ns.val_rows, threads=ns.threads,
                       contenders=tuple(ns.contenders.split(",")), name=ns.name)
    elif ns.cmd == "mfu":
        throughput.mfu(ns.data, ns.rows, ns.steps, ns.repeats, max_length=ns.max_length, threads=ns.threads)
    elif ns.cmd == "search":
        return search.run_from_args(ns)
    elif ns.cmd == "quality":
        quality.run(ns.data.split(","), ns.rows, epochs=ns.epochs, test_rows=ns.test_rows)
    elif ns.cmd == "all":
        t0 = time.time()
        if ns.quick:
            throughput.run("sst2", 2000, 10, 1, val_rows=200, name="quick-throughput-sst2")
            throughput.run("ag_news", 2000, 6, 1, val_rows=100, name="quick-throughput-ag_news")
            search.run(60, rows=300, val_rows=100, name="quick-search-sst2")
            quality.run(["sst2", "ag_news", "trec"], 300, test_rows=300, name="quick-quality")
        else:
            throughput.run("sst2", 2000, 40, 3)
            throughput.run("ag_news", 2000, 20, 3, max_length=128)
            search.run(600)
            quality.run(["sst2", "ag_news", "trec"], 2000)
        print(f"all done in {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
