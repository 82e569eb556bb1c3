# Failover corpus: IPython's history (In, Out, _, __, ___, _N, _iN), magics defined in the
# notebook, macros and event callbacks.

# %% Out and _
6 * 7

# %% _ (check)
_ + 1

# %% _ and __ (check) + Out (check)
print(_, __, Out[1], len(Out))

# %% In, _iN, _N, _i, _ii (check)
print(In[1], _i1, _1, _2)
print(repr(_i), repr(_ii))

# %% ___ (check) + an expression's result kept under _N
"text"

# %% history magic (check)
print(___, _5)
%history -n 1-3

# %% %who and %whos list the variables
answer = 42
names = ["x", "y"]
%who

# %% %whos (check)
%whos

# %% a magic defined in the notebook
from IPython.core.magic import register_line_magic

@register_line_magic
def shout(line):
    return line.upper()

%shout hello

# %% notebook magic (check)
%shout still here

# %% a macro (%macro)
%macro mymacro 7
mymacro

# %% a callback on IPython's events (post_run_cell)
ran = []
def count_cells(result):
    ran.append(result.execution_count)
get_ipython().events.register("post_run_cell", count_cells)

# %% event callback (check)
print(len(ran))

# %% event callback (check, again)
print(len(ran), get_ipython().execution_count)
