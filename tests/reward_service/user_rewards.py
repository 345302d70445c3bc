"""A reward function that test_function_reward loads by module name (the ``package.module:name`` form)."""


def length_score(prompt: str, response: str, **metadata: str) -> float:
    """The response's length in characters."""
    return float(len(response))
