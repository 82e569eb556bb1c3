# Failover corpus: interpreter and IPython state that a cell can change.
# requires: numpy

# %% os.environ + %env + sys.setrecursionlimit + sys.path + decimal context
import decimal
import os
import sys
os.environ["CORPUS_FLAG"] = "on"
%env CORPUS_MAGIC=42
start_dir = os.getcwd()
sys.setrecursionlimit(4321)
sys.path.insert(0, "/corpus-extra-path")
decimal.getcontext().prec = 6
decimal.getcontext().rounding = decimal.ROUND_DOWN
print(sys.getrecursionlimit(), sys.path[0], decimal.Decimal(2) / decimal.Decimal(3))

# %% os.environ, %env, recursion limit, sys.path, decimal context (check)
print(os.environ.get("CORPUS_FLAG"), os.environ.get("CORPUS_MAGIC"))
%env CORPUS_MAGIC
print(sys.getrecursionlimit(), "/corpus-extra-path" in sys.path)
print(decimal.Decimal(1) / decimal.Decimal(7), decimal.getcontext().prec)

# %% np.set_printoptions + np.seterr + warnings filters
import warnings
import numpy as np
np.set_printoptions(precision=2, suppress=True)
old_err = np.seterr(divide="raise")
warnings.simplefilter("error", UserWarning)
print(np.array([1 / 3, 2 / 3, 1e-9]))

# %% printoptions, seterr, warnings filters (check)
print(np.array([1 / 3, 2 / 3, 1e-9]), np.geterr()["divide"])
try:
    np.float64(1.0) / np.float64(0.0)
except FloatingPointError as exc:
    print("raised", exc)
try:
    warnings.warn("strict")
    print("not raised")
except UserWarning as exc:
    print("raised", exc)

# %% %precision + %config (ast_node_interactivity) + %xmode
%precision 3
%config InteractiveShell.ast_node_interactivity = "all"
%xmode Minimal
1 / 3

# %% %precision (check) + %config (check: both expressions displayed)
2 / 3
10 / 7

# %% %xmode (check: a minimal traceback)
def failing():
    raise ValueError("bad value")
failing()

# %% os.chdir (relative to the notebook's directory)
os.makedirs("corpus_subdir", exist_ok=True)
os.chdir("corpus_subdir")
print(os.path.relpath(os.getcwd(), start_dir))

# %% os.chdir (check)
print(os.path.relpath(os.getcwd(), start_dir))
