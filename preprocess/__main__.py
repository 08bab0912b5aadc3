"""``python -m preprocess {synth,from-captions,extract} ...``: each subcommand's module owns its arguments."""

import sys


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {"synth": "preprocess.synth", "from-captions": "preprocess.from_captions", "extract": "preprocess.extract_cli"}
    if not argv or argv[0] not in commands:
        print("usage: python -m preprocess {synth,from-captions,extract} [-h] ...", file=sys.stderr)
        return 2
    module = __import__(commands[argv[0]], fromlist=["cli"])
    return module.cli(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
