"""The one build step pyproject.toml cannot express: the startup file ``dora_fused_inductor.pth``.

Everything else about the package is in pyproject.toml. This file adds a build
sub-command that writes ``dora_fused_inductor.pth`` next to the installed
packages (site-packages), for a regular install (``pip install .``, from the
wheel's root) and an editable one (``pip install -e .``, from the editable
wheel's root) alike. Python runs the file's line at every interpreter start: it
imports ``dora_fused`` and calls ``enable_inductor_hook()`` only when the
environment has ``DORA_FUSED_INDUCTOR=1``; otherwise it costs one dictionary
lookup, and torch is not imported.
"""

from __future__ import annotations

import os
from typing import ClassVar

from setuptools import Command, setup
from setuptools.command.build import build

PTH_NAME = "dora_fused_inductor.pth"
PTH_LINE = (
    'import os; os.environ.get("DORA_FUSED_INDUCTOR") == "1" and __import__("dora_fused").enable_inductor_hook()\n'
)


class build_pth(Command):
    """Write ``dora_fused_inductor.pth`` where the wheel being built takes its top-level files from."""

    description = f"write {PTH_NAME} next to the packages"
    user_options: ClassVar[list[tuple[str, str | None, str]]] = []
    editable_mode = False  # setuptools sets it while building an editable wheel

    def initialize_options(self) -> None:
        self.build_lib: str | None = None

    def finalize_options(self) -> None:
        self.set_undefined_options("build", ("build_lib", "build_lib"))

    def _target(self) -> str:
        # A regular wheel holds what the build commands put in build_lib. An editable wheel
        # holds the package through a path finder, and its other top-level files come from
        # the install command's install_lib (the editable wheel's unpacked root).
        if self.editable_mode:
            return self.get_finalized_command("install").install_lib
        return self.build_lib

    def run(self) -> None:
        target = self._target()
        os.makedirs(target, exist_ok=True)
        with open(os.path.join(target, PTH_NAME), "w", encoding="utf-8") as file:
            file.write(PTH_LINE)

    def get_outputs(self) -> list[str]:
        return [] if self.editable_mode else [os.path.join(self.build_lib, PTH_NAME)]

    def get_output_mapping(self) -> dict[str, str]:
        return {}


class build_with_pth(build):
    """setuptools' ``build``, followed by :class:`build_pth`."""

    sub_commands: ClassVar[list] = [*build.sub_commands, ("build_pth", None)]


setup(cmdclass={"build": build_with_pth, "build_pth": build_pth})
