"""Choose the heads that train: model + batches -> ``HeadScores`` -> ``HeadSelection``.

``scoring`` (the scoring pass: per-head singular-value entropy and cross-head CKA, streamed over the
batches ``batches`` reads), ``pagerank`` (the ranking of DESIGN §1.4), ``importance`` (task-aware
scores from the loss's gradients) and ``selection`` (the selection rules of §1.5).
"""
