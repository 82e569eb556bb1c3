# Failover corpus: user modules written with %%writefile, monkeypatched modules, submodules.

# %% user module written with %%writefile
%%writefile corpus_usermod.py
counter = 0
registry = {}

def bump():
    global counter
    counter += 1
    return counter

def register(name, value):
    registry[name] = value

# %% user module imported, its module-level state mutated
import corpus_usermod
corpus_usermod.bump()
corpus_usermod.bump()
corpus_usermod.register("k", [1, 2])
from corpus_usermod import register as reg
print(corpus_usermod.counter, corpus_usermod.registry)

# %% user module (check)
print(corpus_usermod.counter, corpus_usermod.registry, corpus_usermod.bump())
reg("k2", 3)
print(sorted(corpus_usermod.registry), reg is corpus_usermod.register)

# %% monkeypatched module attribute + patched stdlib function
import json
import string
import textwrap
json.my_attr = 1
string.capwords = lambda s, sep=None: s.upper()
_original_shorten = textwrap.shorten
textwrap.shorten = lambda text, width, **kw: text[:width]
print(json.my_attr, string.capwords("hello world"), textwrap.shorten("abcdefgh", 3))

# %% monkeypatches (check)
json.my_attr += 1
print(json.my_attr, string.capwords("hello world"), textwrap.shorten("abcdefgh", 3))
print(_original_shorten("hello brave new world", width=12))

# %% import xml.dom.minidom, then use the dotted name
import xml.dom.minidom
doc = xml.dom.minidom.parseString("<root><leaf n='1'/></root>")
print(doc.documentElement.tagName)

# %% submodule import (check)
print(xml.dom.minidom.parseString("<r/>").documentElement.tagName)
print(doc.documentElement.firstChild.getAttribute("n"))

# %% submodule aliases and from-imports of submodules
import concurrent.futures
import email.mime.text
import os.path as osp
from collections import abc as cabc
import importlib.util
print(osp.join("a", "b"), cabc.Mapping.__name__)

# %% submodule aliases (check)
with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
    print(pool.submit(sum, [1, 2, 3]).result())
del pool
print(email.mime.text.MIMEText("hi")["Content-Type"], importlib.util.find_spec("json").name)
print(osp.basename("/x/y.txt"), isinstance({}, cabc.Mapping))

# %% a module object created in the notebook (types.ModuleType) kept in sys.modules
import sys
import types
plugin = types.ModuleType("corpus_plugin")
plugin.VERSION = (1, 2)
sys.modules["corpus_plugin"] = plugin
import corpus_plugin
print(corpus_plugin.VERSION)

# %% module created in the notebook (check)
import corpus_plugin as cp_again
print(cp_again.VERSION, cp_again is plugin)
