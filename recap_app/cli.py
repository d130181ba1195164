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


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = _commands()
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in commands:
        print("usage: recap {" + ",".join(commands) + "} [args...]   (recap COMMAND --help for more)")
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    return commands[argv[0]](argv[1:])


if __name__ == "__main__":
    raise SystemExit(main())
