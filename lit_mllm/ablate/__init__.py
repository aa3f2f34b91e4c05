"""Ablation studies: grid files expanded into named arms (:mod:`~lit_mllm.ablate.grid`), each arm checked by the
``lit-mllm fit`` parser (:mod:`~lit_mllm.ablate.resolve`), run locally or as a SLURM job array with resume
(:mod:`~lit_mllm.ablate.runner`), and compared over seeds (:mod:`~lit_mllm.ablate.report`). A ``kind: select``
grid is Individual Select instead: rounds of arms, each adding one candidate source (:mod:`~lit_mllm.ablate.select`).

    lit-mllm sweep ablations/mm1_connector-toy.yaml --dry-run    # the arms and how they differ
    lit-mllm sweep ablations/mm1_connector-toy.yaml              # run (again: finished arms are skipped)
    lit-mllm report runs/ablations/mm1_connector-toy             # tables, plots, TensorBoard HParams
"""
