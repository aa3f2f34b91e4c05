"""``python -m lit_mllm`` is the ``lit-mllm`` command."""

from lit_mllm.cli import main

main()
