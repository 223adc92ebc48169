"""Reward functions for test_rewards.py: good, raising, hanging, non-finite."""
import time


def length_reward(prompt, completion, answer, **meta):
    return len(completion) / 10


def raising_reward(prompt, completion, answer, **meta):
    if "boom" in completion:
        raise RuntimeError("reward exploded")
    return 1.0


def hanging_reward(prompt, completion, answer, **meta):
    if "hang" in completion:
        while True:
            time.sleep(0.01)
    return 0.5


def nan_reward(prompt, completion, answer, **meta):
    return float("nan")


def inf_reward(prompt, completion, answer, **meta):
    return float("inf")


def exiting_reward(prompt, completion, answer, **meta):
    raise SystemExit(3)
