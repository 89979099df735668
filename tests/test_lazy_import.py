"""Lazy Triton: ``import tileattn`` and the README tour run on the CPU backend with Triton hidden
from the import system (a subprocess whose meta-path finder refuses ``triton``)."""

import pathlib
import re
import subprocess
import sys
import textwrap

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"

HIDE_TRITON = textwrap.dedent('''
    import sys

    class HideTriton:
        """Refuses triton and its submodules, as if Triton were not installed."""

        def find_spec(self, name, path=None, target=None):
            if name == "triton" or name.startswith("triton."):
                raise ModuleNotFoundError(f"No module named {name!r} (hidden by the test)")
            return None

    sys.meta_path.insert(0, HideTriton())
''')


def _tour() -> str:
    """The README's first ```python block (the short tour)."""
    match = re.search(r"```python\n(.*?)```", README.read_text(), re.S)
    assert match, "README.md has no python block"
    return match.group(1)


def _run(code: str) -> str:
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(README.parent)}
    proc = subprocess.run([sys.executable, "-c", HIDE_TRITON + code], capture_output=True, text=True, env=env,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_import_without_triton():
    out = _run(textwrap.dedent('''
        import tileattn
        loaded = sorted(m for m in sys.modules if m == "triton" or m.startswith("triton."))
        assert not loaded, loaded
        assert "tileattn.backends.triton" not in sys.modules
        print("ok")
    '''))
    assert out.strip() == "ok"


def test_readme_tour_without_triton():
    """The tour (forward, features, varlen, kvcache, sdpa) plus a backward, all on the CPU
    backend; backend="triton" says it is unavailable, and still nothing imported Triton."""
    out = _run(_tour() + textwrap.dedent('''
        q.requires_grad_()
        tileattn.attention(q, k, v, causal=True).sum().backward()
        assert q.grad is not None and q.grad.isfinite().all()
        import os
        os.environ["TRITON_INTERPRET"] = "1"
        try:
            tileattn.attention(q.detach().half(), k.half(), v.half(), backend="triton")
        except NotImplementedError as err:
            assert "unavailable" in str(err), err
        else:
            raise AssertionError("backend='triton' ran without Triton")
        assert not [m for m in sys.modules if m == "triton" or m.startswith("triton.")]
        print("tour ok")
    '''))
    assert out.strip().endswith("tour ok")
