"""The vLLM side, and the only place that imports vLLM's internals (a vLLM upgrade changes
this subpackage): plug-in registration (`registration`), the model loaders (`loader`), the
worker extension (`worker`), the engine wrapper the command line drives (`engine`), and
vLLM's tensorizer-module names that touch an engine (`module_api`). Everything else in the
package is plain Python and torch.
"""
