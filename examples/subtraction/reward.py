"""The subtraction example's reward: a plain Python function Relay loads by path.

Relay calls it once per sample as ``reward(prompt, response, **metadata)``; the metadata are the
record's other columns (here ``answer``). It recomputes the difference from the prompt itself, so it
needs no answer column, and checks that the answer column agrees when there is one.
"""

import re

_PROMPT = re.compile(r"(\d+)-(\d+)=")


def reward(prompt: str, response: str, **metadata: str) -> float:
    """1.0 if the response is exactly the difference, else 0.0."""
    match = _PROMPT.search(prompt)
    if match is None:
        raise ValueError(f"not a subtraction prompt: {prompt!r}")
    expected = str(int(match[1]) - int(match[2]))
    if "answer" in metadata and metadata["answer"] != expected:
        raise ValueError(f"the record's answer {metadata['answer']} disagrees with {prompt!r}")
    return 1.0 if response.strip() == expected else 0.0
