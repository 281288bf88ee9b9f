"""The finegrain command line (placeholder until the CLI lands)."""


def main() -> None:
    raise SystemExit("finegrain: CLI not built yet")
