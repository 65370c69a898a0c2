"""How an S3 client is set up: credentials, endpoint, addressing style, signature and TLS.

Resolved once per `StreamOptions` from the options, the environment (read in
`settings.environment`), ``~/.s3cfg`` (s3cmd's file, as tensorizer 2.12's ``open_stream``
reads it) and the AWS config files (through botocore's own configuration handling). The
full table, beside what tensorizer honours, is in docs/s3.md.

Credentials, first found wins:
  1. ``s3_access_key_id`` / ``s3_secret_access_key`` (config, flags, ``stream_kwargs``),
     else the ``S3_ACCESS_KEY_ID`` / ``S3_SECRET_ACCESS_KEY`` variables; both empty strings
     mean anonymous access (a public bucket), as in tensorizer;
  2. an ``s3_config_path`` given explicitly (it must exist), section ``[default]``;
  3. boto3's standard chain (``AWS_ACCESS_KEY_ID``..., ``AWS_PROFILE`` and ``~/.aws``,
     container and IRSA roles);
  4. ``~/.s3cfg``, section ``[default]``; else anonymous.

Endpoint, first found wins: ``s3_endpoint`` (else ``S3_ENDPOINT_URL``),
``AWS_ENDPOINT_URL_S3``, ``AWS_ENDPOINT_URL``, ``host_base`` of ``~/.s3cfg``, the AWS config
file (``endpoint_url`` of the profile or of its ``services`` section, as botocore reads them,
then the profile's ``s3 = endpoint_url = ...`` as tensorizer reads it), else AWS. A plain
``http://`` endpoint is refused unless ``force_http`` allows it.

Addressing style (``https://BUCKET.host/KEY`` "virtual" or ``https://host/BUCKET/KEY``
"path"), first found wins: ``stream_kwargs`` ``addressing_style``; ``s3.addressing_style``
in the AWS config file; ``host_bucket`` of ``~/.s3cfg`` when that file gave the endpoint
(virtual when it holds ``%(bucket)s``, as s3cmd reads it); "virtual" for CoreWeave's
``cwobject.com`` and ``cwlota.com`` (they refuse path-style requests; tensorizer 2.12's
special case); "path" for any other custom endpoint (MinIO, SeaweedFS, moto, Ceph); botocore's
"auto" on AWS (virtual-hosted for DNS-compatible bucket names).
"""

from __future__ import annotations

import configparser
import os
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from ..core.errors import ConfigError, CredentialsError
from ..core.settings import environment
from .options import StreamOptions

__all__ = ["ADDRESSING_STYLES", "VIRTUAL_HOSTED_ENDPOINTS", "S3Settings", "resolve"]

ADDRESSING_STYLES = ("auto", "virtual", "path")
# Hosts that refuse path-style requests (tensorizer 2.12, stream_io._is_caios).
VIRTUAL_HOSTED_ENDPOINTS = frozenset({"cwobject.com", "cwlota.com"})


@dataclass(frozen=True)
class S3Settings:
    """What a boto3 S3 client is built from, and where each part came from (for messages).

    Attributes:
        endpoint: the endpoint URL with its scheme, or None for AWS.
        endpoint_source: where `endpoint` came from ("AWS" when None).
        addressing_style: "virtual", "path" or "auto" (botocore's names).
        addressing_source: where `addressing_style` came from.
        credentials: how the credentials were found (never the credentials themselves).
        signature_version: botocore's signature version, ``botocore.UNSIGNED`` for anonymous
            access, or None for botocore's default (SigV4).
        client_kwargs: ``aws_access_key_id`` / ``aws_secret_access_key`` for the client, if
            found outside boto3's own chain.
    """

    endpoint: str | None
    endpoint_source: str
    addressing_style: str
    addressing_source: str
    credentials: str
    signature_version: Any = None
    client_kwargs: dict[str, str] = field(default_factory=dict, repr=False)


def read_s3cfg(path: str | None, *, required: bool = False) -> dict[str, str]:
    """The ``[default]`` section of s3cmd's config file (``~/.s3cfg`` unless `path`).

    Raises:
        ConfigError: the file cannot be parsed, or `required` and it does not exist.
    """
    path = os.path.expanduser(path or "~/.s3cfg")
    if required and not os.path.isfile(path):
        raise ConfigError(f"s3_config_path {path}: no such file")
    parser = configparser.ConfigParser(interpolation=None)
    try:
        if not parser.read(path):
            return {}
    except configparser.Error as e:
        raise ConfigError(f"cannot read the S3 config file {path}: {e}") from None
    return dict(parser["default"]) if parser.has_section("default") else {}


def resolve(options: StreamOptions) -> S3Settings:
    """The settings of a client for `options` (reads the environment and config files).

    Raises:
        ConfigError: a setting is invalid or names something missing (named).
    """
    from botocore.exceptions import PartialCredentialsError, ProfileNotFound

    _check_pairs(options)
    try:
        return _resolve(options)
    except ProfileNotFound as e:
        raise ConfigError(
            f"{e} (AWS_PROFILE names a profile that is not in the AWS config files)"
        ) from None
    except PartialCredentialsError as e:  # e.g. AWS_ACCESS_KEY_ID set, its secret not
        missing = {"secret_key": "AWS_SECRET_ACCESS_KEY", "access_key": "AWS_ACCESS_KEY_ID"}
        needed = missing.get(str(e.kwargs.get("cred_var")), e.kwargs.get("cred_var"))
        raise CredentialsError(
            f"incomplete S3 credentials from the {e.kwargs.get('provider')} provider: "
            f"{needed} is missing (set both, or neither)"
        ) from None


def _check_pairs(options: StreamOptions) -> None:
    """An access key without its secret (or the reverse) is refused, naming the missing."""
    key, secret = options.get("s3_access_key_id"), options.get("s3_secret_access_key")
    if bool(key) != bool(secret):
        given, missing = (
            ("s3_access_key_id / S3_ACCESS_KEY_ID", "s3_secret_access_key / S3_SECRET_ACCESS_KEY")
            if key
            else (
                "s3_secret_access_key / S3_SECRET_ACCESS_KEY",
                "s3_access_key_id / S3_ACCESS_KEY_ID",
            )
        )
        raise CredentialsError(
            f"incomplete S3 credentials: {given} is set but {missing} is not (set both, or neither)"
        )


def _resolve(options: StreamOptions) -> S3Settings:
    import boto3
    import botocore

    s3cfg = _S3cfg(options.get("s3_config_path"))
    key, secret = options.get("s3_access_key_id"), options.get("s3_secret_access_key")
    kwargs: dict[str, str] = {}
    signature = options.get("s3_signature_version")
    if key == "" and secret == "":
        signature, how = botocore.UNSIGNED, "anonymous (empty keys given)"
    elif key and secret:
        kwargs.update(aws_access_key_id=key, aws_secret_access_key=secret)
        how = "the configured access key"
    elif options.get("s3_config_path") and s3cfg.has_keys():
        kwargs.update(s3cfg.keys())
        how = options.get("s3_config_path")
    elif boto3.session.Session().get_credentials() is not None:
        how = "the AWS credential chain"
    elif s3cfg.has_keys():
        kwargs.update(s3cfg.keys())
        how = "~/.s3cfg"
    else:
        signature, how = (
            botocore.UNSIGNED,
            (
                "anonymous: no credentials found in the config, S3_* variables, the AWS chain or "
                "~/.s3cfg"
            ),
        )
    endpoint, endpoint_source, force_http = _endpoint(options, s3cfg)
    style, style_source = _addressing(options, endpoint, endpoint_source, s3cfg)
    return S3Settings(
        endpoint=_endpoint_url(endpoint, force_http),
        endpoint_source=endpoint_source,
        addressing_style=style,
        addressing_source=style_source,
        credentials=how,
        signature_version=signature,
        client_kwargs=kwargs,
    )


class _S3cfg:
    """``~/.s3cfg`` (or an explicit path), read at most once, only when needed."""

    def __init__(self, path: str | None):
        self._path = path
        self._values: dict[str, str] | None = None

    @property
    def values(self) -> dict[str, str]:
        if self._values is None:
            self._values = read_s3cfg(self._path, required=bool(self._path))
        return self._values

    def has_keys(self) -> bool:
        return bool(self.values.get("access_key") and self.values.get("secret_key"))

    def keys(self) -> dict[str, str]:
        return {
            "aws_access_key_id": self.values["access_key"],
            "aws_secret_access_key": self.values["secret_key"],
        }


def _endpoint(options: StreamOptions, s3cfg: _S3cfg) -> tuple[str | None, str, bool]:
    """(endpoint, where it came from, whether plain HTTP is allowed)."""
    if options.get("s3_endpoint"):
        return options.get("s3_endpoint"), "s3_endpoint", bool(options.get("force_http"))
    env = environment()
    if env.aws_endpoint_url:
        return env.aws_endpoint_url, "AWS_ENDPOINT_URL", bool(options.get("force_http"))
    if s3cfg.values.get("host_base"):
        use_https = s3cfg.values.get("use_https", "").strip().lower()
        return (
            s3cfg.values["host_base"],
            "host_base of ~/.s3cfg",
            bool(options.get("force_http")) or use_https == "false",
        )
    configured = _aws_config_endpoint()
    if configured:
        return configured, "the AWS config file", bool(options.get("force_http"))
    return None, "AWS", bool(options.get("force_http"))


def _aws_config_endpoint() -> str | None:
    """``endpoint_url`` for S3 in the AWS config file, as botocore reads it (its profile's
    ``services`` section, then the profile), then the profile's nested ``s3`` section (as
    tensorizer reads it); None when ``AWS_IGNORE_CONFIGURED_ENDPOINT_URLS`` is set."""
    import botocore.session
    from botocore.configprovider import ConfiguredEndpointProvider

    session = botocore.session.Session()
    if session.get_config_variable("ignore_configured_endpoint_urls"):
        return None
    scoped = session.get_scoped_config()
    # environ={}: the AWS_ENDPOINT_URL* variables were read already, in settings.environment.
    provider = ConfiguredEndpointProvider(
        full_config=session.full_config, scoped_config=scoped, client_name="s3", environ={}
    )
    nested = scoped.get("s3")
    return provider.provide() or (nested.get("endpoint_url") if isinstance(nested, dict) else None)


def _addressing(
    options: StreamOptions, endpoint: str | None, endpoint_source: str, s3cfg: _S3cfg
) -> tuple[str, str]:
    """(addressing style, where it came from)."""
    if options.get("addressing_style"):
        return options.get("addressing_style"), "stream_kwargs addressing_style"
    import botocore.session

    configured = (botocore.session.Session().get_config_variable("s3") or {}).get(
        "addressing_style"
    )
    if configured:
        if configured not in ADDRESSING_STYLES:
            raise ConfigError(
                f"s3.addressing_style {configured!r} in the AWS config file: "
                f"expected one of {', '.join(ADDRESSING_STYLES)}"
            )
        return configured, "s3.addressing_style in the AWS config file"
    if endpoint is None:
        return "auto", "AWS's default"
    host_bucket = s3cfg.values.get("host_bucket") if endpoint_source.endswith("s3cfg") else None
    if host_bucket:
        return ("virtual" if "%(bucket)s" in host_bucket else "path"), "host_bucket of ~/.s3cfg"
    if _host(endpoint) in VIRTUAL_HOSTED_ENDPOINTS:
        return "virtual", f"{_host(endpoint)} refuses path-style requests"
    return "path", "a custom endpoint"


def _host(endpoint: str) -> str:
    return (urlsplit(endpoint if "://" in endpoint else "//" + endpoint).hostname or "").lower()


def _endpoint_url(endpoint: str | None, force_http: bool) -> str | None:
    if not endpoint:
        return None
    if "://" not in endpoint:
        endpoint = ("http://" if force_http else "https://") + endpoint
    if endpoint.startswith("http://") and not force_http:
        raise ConfigError(
            f"the S3 endpoint {endpoint} is plain http:// and would send credentials and data "
            "unencrypted; allow it with --allow-http (command line) or "
            '{"stream_kwargs": {"force_http": true}} in the tensorizer config'
        )
    return endpoint
