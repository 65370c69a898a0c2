"""Settings from the environment, and value parsing shared by every layer (the bottom layer).

`environment()` is the only place that reads this package's environment variables, each
one lazily, when the code that uses it asks (`set_prefetch_map` the only place that writes
one); `parse_bool` reads the booleans of
configs and ``stream_kwargs``, `parse_switch` an on/off environment variable. This module imports
nothing from the package but `errors`, so `storage` and `config` can both use it.
"""

from __future__ import annotations

import json
import os
import stat
from typing import Any

from .errors import ConfigError

__all__ = [
    "Environment",
    "environment",
    "parse_bool",
    "parse_switch",
    "set_prefetch_map",
    "OVERLAP_ENV",
    "PREFETCH_ENV",
    "COMPILE_CACHE_ENV",
    "AOT_FIX_ENV",
]

# The opt-in switch of `prefetch`'s overlap of a remote download with vLLM's start-up.
OVERLAP_ENV = "TENSORIZE_VLLM_MODEL_OVERLAP"
# `prefetch`'s map of remote URI -> local copy (JSON), inherited by vLLM's processes.
PREFETCH_ENV = "TENSORIZE_VLLM_MODEL_PREFETCH"
# The switch of `compile_cache` (ship vLLM's compile cache with the model; on by default).
COMPILE_CACHE_ENV = "TENSORIZE_VLLM_MODEL_COMPILE_CACHE"
# The switch of `integrations.vllm.aot_load` (let vLLM load its AOT cache on CPU; on by default).
AOT_FIX_ENV = "TENSORIZE_VLLM_MODEL_AOT_FIX"
_ON = ("1", "true", "yes", "on")
_OFF = ("", "0", "false", "no", "off")


def parse_bool(value: Any, key: str) -> Any:
    """`value` as a boolean: a bool or None as it is, the strings "true"/"false" in any
    case (as older vLLM docs pass them, e.g. ``{"force_http": "False"}``) as what they say.

    Raises:
        ConfigError: any other value, naming `key`.
    """
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise ConfigError(f"{key} must be true or false, got {value!r}")


def parse_switch(value: str | None, key: str) -> bool:
    """An on/off environment variable: unset, empty, ``0``/``false``/``no``/``off`` are off;
    ``1``/``true``/``yes``/``on`` (any case) are on.

    Raises:
        ConfigError: any other value, naming the variable `key`.
    """
    text = (value or "").strip().lower()
    if text in _ON or text in _OFF:
        return text in _ON
    raise ConfigError(f"{key} must be 1 or 0 (on or off), got {value!r}")


class Environment:
    """The environment variables this package honours, each read when its attribute is read
    (as vLLM's ``envs.py``): a bad value is refused, naming the variable, only by the code
    that uses it, and reading one variable never parses another.

    ``S3_ACCESS_KEY_ID``, ``S3_SECRET_ACCESS_KEY``, ``S3_ENDPOINT_URL`` (as in vLLM);
    ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL`` (the AWS SDKs' endpoint variables; the
    AWS credential variables are read by boto3 itself); ``TENSORIZE_VLLM_MODEL_CACHE`` (where
    the config and tokenizer files of remote models are kept, `cache_dir`);
    ``TENSORIZE_VLLM_MODEL_OVERLAP`` and ``TENSORIZE_VLLM_MODEL_PREFETCH`` (`prefetch`);
    ``TENSORIZE_VLLM_MODEL_COMPILE_CACHE`` and ``TENSORIZE_VLLM_MODEL_AOT_FIX`` (on unless
    0): the compile cache shipped with a model, and vLLM's AOT load on CPU.
    """

    __slots__ = ()

    @property
    def s3_access_key_id(self) -> str | None:
        return os.environ.get("S3_ACCESS_KEY_ID")

    @property
    def s3_secret_access_key(self) -> str | None:
        return os.environ.get("S3_SECRET_ACCESS_KEY")

    @property
    def s3_endpoint_url(self) -> str | None:
        return os.environ.get("S3_ENDPOINT_URL")

    @property
    def aws_endpoint_url(self) -> str | None:
        return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")

    @property
    def cache_root(self) -> str:
        """``TENSORIZE_VLLM_MODEL_CACHE``, else ``$XDG_CACHE_HOME/tensorize_vllm_model``, else
        ``~/.cache/tensorize_vllm_model``; nothing is made or checked (see `cache_dir`)."""
        env = os.environ
        return env.get("TENSORIZE_VLLM_MODEL_CACHE") or os.path.join(
            env.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"),
            "tensorize_vllm_model",
        )

    @property
    def cache_dir(self) -> str:
        """The cache directory to use now: `cache_root`, or in shared mode (a directory with
        the sticky bit that its group or all may write: 1777 as /tmp, a team's 3775) this
        user's private 0700 ``user-<uid>`` in it, made if missing (`user_cache`), so no user
        sees or replaces another's files. Read only where the cache is used.

        Raises:
            ConfigError: see `user_cache`.
        """
        return user_cache(self.cache_root)

    @property
    def overlap(self) -> bool:
        """`prefetch`'s opt-in overlap (``TENSORIZE_VLLM_MODEL_OVERLAP``, off unless set).

        Raises:
            ConfigError: a value other than 1/0, true/false, yes/no, on/off.
        """
        return parse_switch(os.environ.get(OVERLAP_ENV), OVERLAP_ENV)

    @property
    def prefetch_map(self) -> dict[str, str]:
        """`prefetch`'s remote URI -> local copy path (``TENSORIZE_VLLM_MODEL_PREFETCH``).

        Raises:
            ConfigError: the value is not a JSON object.
        """
        return _prefetch_map(os.environ.get(PREFETCH_ENV))

    @property
    def compile_cache(self) -> bool:
        """`compile_cache`: keep vLLM's compile cache with the model and put it back at
        load (``TENSORIZE_VLLM_MODEL_COMPILE_CACHE``, on unless set to 0).

        Raises:
            ConfigError: a value that is not a switch.
        """
        return _default_on(os.environ.get(COMPILE_CACHE_ENV), COMPILE_CACHE_ENV)

    @property
    def aot_fix(self) -> bool:
        """`integrations.vllm.aot_load` (``TENSORIZE_VLLM_MODEL_AOT_FIX``, on unless 0).

        Raises:
            ConfigError: a value that is not a switch.
        """
        return _default_on(os.environ.get(AOT_FIX_ENV), AOT_FIX_ENV)

    def __repr__(self) -> str:
        return "Environment()"


_ENVIRONMENT = Environment()


def environment() -> Environment:
    """The environment: each attribute read (and checked) when it is read, never before."""
    return _ENVIRONMENT


def user_cache(cache: str) -> str:
    """`cache`, or in shared mode (a directory with the sticky bit that its group or all
    may write: 1777 as /tmp, a team's 3775) this user's private 0700
    ``cache/user-<uid>`` (made if missing).

    Raises:
        ConfigError: ``user-<uid>`` is not a directory of this user (another user made it
            first, or a link): nothing is cached there.
    """
    try:
        mode = os.stat(cache).st_mode
    except OSError:
        return cache
    if not (mode & 0o1000 and mode & 0o022):  # sticky and writable by its group or all
        return cache  # (1777 as /tmp, or a team's 3775): else one user's own
    private = os.path.join(cache, f"user-{os.getuid()}")
    try:
        os.makedirs(private, mode=0o700, exist_ok=True)
        info = os.lstat(private)
    except OSError as e:
        raise ConfigError(f"cannot create the private cache directory {private}: {e}") from None
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():
        raise ConfigError(
            f"{private} in the shared cache {cache} is not a directory of this user; remove "
            "it (or set TENSORIZE_VLLM_MODEL_CACHE to a directory of your own)"
        )
    if stat.S_IMODE(info.st_mode) != 0o700:
        os.chmod(private, 0o700)
    return private


def _default_on(value: str | None, key: str) -> bool:
    """A switch that is on unless set to an off value."""
    return True if value is None or not value.strip() else parse_switch(value, key)


def _prefetch_map(text: str | None) -> dict[str, str]:
    try:
        mapping = json.loads(text or "{}")
    except ValueError:
        mapping = None
    if not isinstance(mapping, dict):
        raise ConfigError(f"{PREFETCH_ENV} must be a JSON object, got {text!r}")
    return {str(k): str(v) for k, v in mapping.items()}


def set_prefetch_map(mapping: dict[str, str]) -> None:
    """Record `prefetch`'s map in this process's environment, which the processes vLLM
    spawns next inherit."""
    os.environ[PREFETCH_ENV] = json.dumps(mapping)


# The variables the gs:// and az:// backends read (storage/gcs.py, storage/azure.py;
# docs/gcs-azure.md). google-auth and azure-identity read their own credential variables.
STORAGE_VARIABLES = (
    "STORAGE_EMULATOR_HOST",
    "GOOGLE_APPLICATION_CREDENTIALS",
    "AZURE_STORAGE_CONNECTION_STRING",
    "AZURE_STORAGE_ACCOUNT_NAME",
    "AZURE_STORAGE_ACCOUNT_KEY",
    "AZURE_STORAGE_SAS_TOKEN",
    "AZURE_STORAGE_BLOB_ENDPOINT",
    "AZURE_STORAGE_ENDPOINT_SUFFIX",
)


def storage_variable(name: str) -> str | None:
    """One of `STORAGE_VARIABLES`, read now; unset or empty is None.

    Raises:
        ValueError: `name` is not one of them (a programming error).
    """
    if name not in STORAGE_VARIABLES:
        raise ValueError(f"{name} is not a storage variable")
    return os.environ.get(name) or None


# The CA bundle variables, in the order they are honoured after --ca-bundle / ca_bundle
# (docs/gcs-azure.md, "TLS trust"): the AWS SDK's, requests', OpenSSL's.
CA_BUNDLE_VARIABLES = ("AWS_CA_BUNDLE", "REQUESTS_CA_BUNDLE", "SSL_CERT_FILE")


def ca_bundle(given: str | None) -> tuple[str | None, str]:
    """The CA bundle to trust for TLS and where it came from: `given` (``--ca-bundle`` /
    ``ca_bundle``), else the first of `CA_BUNDLE_VARIABLES` set, else (None, "the system
    store")."""
    if given:
        return given, "ca_bundle"
    for name in CA_BUNDLE_VARIABLES:
        if os.environ.get(name):
            return os.environ[name], name
    return None, "the system store"
