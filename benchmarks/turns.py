"""Side-by-side measurement in one process: contenders take turns, round after round, so the
machine's drift (2-3x between hours on the shared VMs here) hits every one alike."""

import sys
from collections.abc import Callable


def median(values: list[float]) -> float:
    """The middle value (the upper one of an even count): a whole round's figure, never an average."""
    return sorted(values)[len(values) // 2]


def medians_in_turns(contenders: dict[str, Callable[[], float]], rounds: int, label: str) -> dict[str, float]:
    """Each contender's figure (one call each round), the order reversed every other round; the
    median round of each, in the contenders' order. Each result goes to stderr as it comes."""
    results = {name: [] for name in contenders}
    for round_ in range(rounds):
        order = list(contenders) if round_ % 2 == 0 else list(reversed(contenders))
        for name in order:
            results[name].append(contenders[name]())
            print(f"  {label}, round {round_ + 1}: {name} {results[name][-1]:.0f}", file=sys.stderr, flush=True)
    return {name: median(values) for name, values in results.items()}
