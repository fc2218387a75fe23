"""The pure-Python work MGSpin does; tests time it in their own process to size a prompt in seconds."""


def spin(blocks: int) -> int:
    total = 0
    for _ in range(blocks):
        for _ in range(1000):
            total += 1
    return total
