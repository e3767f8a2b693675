"""Typed errors. Each says what was wrong and what to do instead."""


class DiffattnError(Exception):
    """Base class of every error diffattn raises on bad input."""


class SelectorError(DiffattnError, KeyError):
    """A selector names a site or head that does not exist (the message lists what exists)."""

    def __str__(self):  # KeyError would repr() the message; keep it readable
        return str(self.args[0]) if self.args else ""


class UnsupportedModelError(DiffattnError, TypeError):
    """The model or pipeline has no attention family diffattn knows."""


class ControlError(DiffattnError, ValueError):
    """A control was configured or attached wrongly (out-of-range strength, attached twice...)."""


class LayoutError(DiffattnError, ValueError):
    """A segment or tap asks for tokens the attention call does not have."""
