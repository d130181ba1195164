"""`recap` console script: train | evaluate | generate-data | export | summary | import-config."""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence


def _commands() -> dict[str, Callable[[Sequence[str]], int]]:
    # Imported lazily: torchrec costs seconds to import and `recap --help` should not.
    def train(argv: Sequence[str]) -> int:
        from recap_app.train import main

        return main(argv)

    def evaluate(argv: Sequence[str]) -> int:
        from recap_app.evaluate import main

        return main(argv)

    def generate_data(argv: Sequence[str]) -> int:
        from recap_app.synthetic_data import generate_data_main

        return generate_data_main(list(argv))

    def export(argv: Sequence[str]) -> int:
        from recap_app.export import main

        return main(argv)

    def import_config(argv: Sequence[str]) -> int:
        from recap_app.import_config import main

        return main(argv)

    def summary(argv: Sequence[str]) -> int:
        from recap_app.summary import main

        return main(argv)

    return {
        "train": train,
        "evaluate": evaluate,
        "generate-data": generate_data,
        "export": export,
        "summary": summary,
        "import-config": import_config,
    }


PURPOSES = {
    "train": "train the ranker (one process here; torchx run recap.train for torchrun and clusters)",
    "evaluate": "score a checkpoint on a Parquet dataset, every example once; writes eval_metrics.json",
    "generate-data": "write a synthetic, learnable Parquet dataset for a config",
    "export": "write a sharded checkpoint as one plain ranker state dict (model.pt)",
    "summary": "list a run's checkpoints, embedding logs and last metrics",
}


def usage() -> str:
    width = max(map(len, PURPOSES))
    lines = [f"  {name:<{width}}  {what}" for name, what in PURPOSES.items()]
    return "\n".join(
        [
            "usage: recap COMMAND [args...]",
            "",
            "Train and evaluate Twitter's Recap heavy ranker with sharded torchrec embeddings.",
            "",
            "commands:",
            *lines,
            "",
            "`recap COMMAND --help` for a command's options.",
        ]
    )


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = _commands()
    if argv and argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    if not argv or argv[0] not in commands:
        problem = "no command given" if not argv else f"unknown command {argv[0]!r}"
        print(
            f"usage: recap COMMAND [args...]\nrecap: error: {problem} (choose from {', '.join(commands)}; "
            "recap --help says what each does)",
            file=sys.stderr,
        )
        return 2
    return commands[argv[0]](argv[1:])


if __name__ == "__main__":
    raise SystemExit(main())
