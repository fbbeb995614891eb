"""Errors a user reads on a node: which node, which input, what is wrong, how to fix it."""


class SafeRoPEInputError(ValueError):
    """Bad input to a SafeRoPE node. ComfyUI shows the message on the node."""

    def __init__(self, node: str, input_name: str, problem: str, fix: str = ""):
        self.node, self.input_name = node, input_name
        message = f"{node}, input '{input_name}': {problem}"
        super().__init__(f"{message}. {fix}" if fix else message)
