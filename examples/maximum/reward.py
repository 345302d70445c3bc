"""The maximum example's reward: a plain Python function Relay loads by path.

Relay calls it once per sample as ``reward(prompt, response, **metadata)``; the metadata are the
record's other columns (here ``numbers`` and ``answer``). It recomputes the answer from the prompt, so it
needs no answer column, and checks that the answer column agrees when there is one.
"""

import re

_NUMBERS = re.compile(r"max (\d+) (\d+) (\d+)=")


def reward(prompt: str, response: str, **metadata: str) -> float:
    """1.0 if the response is exactly the largest of the three numbers, else 0.0."""
    match = _NUMBERS.search(prompt)
    if match is None:
        raise ValueError(f"not a maximum prompt: {prompt!r}")
    expected = str(max(int(x) for x in match.groups()))
    if "answer" in metadata and metadata["answer"] != expected:
        raise ValueError(f"the record's answer {metadata['answer']} disagrees with {prompt!r}")
    return 1.0 if response.strip() == expected else 0.0
