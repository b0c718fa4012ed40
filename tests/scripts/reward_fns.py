"""Reward callables used by the tests through the 'file.py:function' spec."""


def likes_tea(prompts, completions):
    """+1 per 'tea' and −0.1 per token: a reward every tiny model can move toward."""
    return [c.split().count("tea") - 0.1 * len(c.split()) for c in completions]
