"""The examples in the docstrings and in the README run and print what they say."""

import doctest
import pathlib
import re

import jax
import pytest

import optax_ftml._ftml
import optax_ftml._mxnet

README = pathlib.Path(__file__).parent.parent / "README.md"


@pytest.mark.parametrize("module", [optax_ftml._ftml, optax_ftml._mxnet])
def test_docstring_examples(module):
  with jax.numpy_dtype_promotion("standard"):
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
  assert result.attempted > 0
  assert result.failed == 0


@pytest.mark.parametrize("index", range(len(re.findall(
    r"```python\n", README.read_text()))))
def test_readme_python_blocks(index):
  block = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)[index]
  with jax.numpy_dtype_promotion("standard"):  # user code, default promotion
    exec(compile(block, f"README.md block {index}", "exec"), {})
