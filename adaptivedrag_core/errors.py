"""User-facing input errors: the CLI prints their message on one line and exits with status 2,
and the ComfyUI nodes let ComfyUI show the message on the node."""


class InputError(ValueError):
    """Bad user input (points, image, mask, model path, option); the message names the problem."""
