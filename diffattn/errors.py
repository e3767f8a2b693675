"""Typed errors, all in one place. Each says what was wrong and what to do instead.

Every error diffattn raises on bad input is a :class:`DiffattnError`, and also the builtin
exception of its category, so ``except ValueError`` / ``except KeyError`` keep working:

==========================  ============  ===============================================
error                       category      raised for
==========================  ============  ===============================================
:class:`SelectorError`      KeyError      a site or head selector that matches nothing
:class:`UnsupportedModelError` TypeError  a model / pipeline of no known attention family
:class:`ControlError`       ValueError    a control configured or attached wrongly
:class:`ConfigError`        ValueError    a bad value in a method's config dataclass
:class:`LayoutError`        ValueError    a segment or tap outside the call's tokens
:class:`ConceptError`       ValueError    A-STAR concepts (missing, empty, malformed)
:class:`ObjectiveError`     ValueError    a HeadHunter objective (unknown, unloadable)
:class:`ImageInputError`    ValueError    an image that cannot be inverted as given
:class:`EditPromptError`    ValueError    source / target prompts that cannot be edited
:class:`KernelError`        ValueError    bad input to an attention kernel
:class:`MethodError`        ValueError    a method record or its parameters
:class:`UnknownMethodError` KeyError      a method name the registry does not know
:class:`UsageError`         ValueError    a command-line / call argument out of range or of the wrong form
:class:`LimitError`         ValueError    a size or step count above the configured limit (names the flag)
:class:`PathError`          OSError       an input that is missing / unreadable, an output that cannot be written
:class:`ModelLoadError`     OSError       a model name, folder or checkpoint that cannot be loaded
==========================  ============  ===============================================

The old import paths (``diffattn.methods.astar.ConceptError``,
``diffattn.pipelines.uam.ImageInputError``, ``diffattn.kernels.KernelError``...) re-export
these classes.
"""


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


class ConfigError(ControlError):
    """A method's configuration holds a bad value (an unknown option, a fraction outside
    [0, 1], a negative radius...). A :class:`ControlError` too: configuring a method is
    configuring its control, and code that caught ``ControlError`` keeps catching it."""


class LayoutError(DiffattnError, ValueError):
    """A segment or tap asks for tokens the attention call does not have."""


class ConceptError(DiffattnError, ValueError):
    """A concept is missing from the prompt, or the concept list is empty or malformed."""


class ObjectiveError(DiffattnError, ValueError):
    """A search objective was named or configured wrongly (unknown name, a scorer model that
    cannot be loaded or has no safetensors weights)."""


class ImageInputError(DiffattnError, ValueError):
    """The image cannot be inverted as given (mode, size, value range)."""


class EditPromptError(DiffattnError, ValueError):
    """The source / target prompts cannot be edited as asked (empty target, token counts differ)."""


class KernelError(DiffattnError, ValueError):
    """Bad input to an attention kernel (shapes, dtypes, head dims, an impossible option).

    The message says what was wrong and what to pass instead.
    """


class MethodError(DiffattnError, ValueError):
    """A method of the registry was declared or called wrongly (a duplicate name, a parameter
    it does not have, a value outside its choices or range)."""


class UnknownMethodError(MethodError, KeyError):
    """No method of that name is registered (the message lists the known ones)."""

    def __str__(self):  # KeyError would repr() the message; keep it readable
        return str(self.args[0]) if self.args else ""


class UsageError(DiffattnError, ValueError):
    """An argument out of its range or of the wrong form (``--steps 0``, ``--guidance nan``, a seed
    beyond 64 bits, a flag that does not apply to the chosen method)."""


class LimitError(UsageError):
    """A size or a step count above the configured limit; the message names the limit and the
    flag / environment variable that raises it (``--max-side``, ``DIFFATTN_MAX_SIDE``...)."""


class PathError(DiffattnError, OSError):
    """An input file that does not exist or cannot be read, or an output path that cannot be
    written (missing directory, no permission, unknown extension), found before any work."""


class ModelLoadError(DiffattnError, OSError):
    """A model that cannot be loaded: an unknown name (the message lists the known ones), a folder
    that is not a diffusers pipeline, a malformed ``testbed.json``, a truncated or pickle checkpoint."""


class WorkflowError(DiffattnError, ValueError):
    """A workflow file (``diffattn run``) is malformed: an unknown control, a bad parameter,
    a missing model or prompt. The message names the node and the field."""
