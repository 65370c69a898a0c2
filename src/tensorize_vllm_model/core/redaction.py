"""The one redaction of secrets in URIs and in any text that may carry one.

Signed URLs carry their credential in the query string: an Azure SAS (``sv=...&sig=...``),
a Google Cloud Storage signed URL (``X-Goog-Signature``, ``X-Goog-Credential``), an S3
presigned URL (``X-Amz-Signature``, ``X-Amz-Credential``, ``X-Amz-Security-Token``).
`redact_uri` shows a URI without its query string and user info (every backend's
``redact`` is it); `redact_text` does the same to every URI inside a text, and blanks the
value of every signature, credential, token or account-key parameter left anywhere else
(a path-only ``/blob?sig=...`` of a library's message, a connection string). The package's
errors (`errors.TensorizeError`) and its loggers (`scrubbing`) pass their text through
`redact_text`, so a URI reaching a message, a log line or an exception shows no secret,
whoever formatted it.

This module imports nothing of the package (core/errors.py imports it).
"""

from __future__ import annotations

import logging
import re
import threading

__all__ = [
    "redact_uri",
    "redact_text",
    "has_signed_query",
    "RedactingFilter",
    "scrubbing",
    "REDACTED",
]

REDACTED = "[redacted]"
# scheme://authority/path?query#fragment, as it appears inside a text (up to white space or
# a quote or bracket that closes it)
_URI = re.compile(r"\b([a-zA-Z][a-zA-Z0-9+.-]*://)([^\s'\"<>()\[\]?#]*)(\?[^\s'\"<>()\[\]]*)?")
# a parameter whose value is a secret, wherever it stands (query strings without their URI,
# connection strings ``AccountKey=...;SharedAccessSignature=sv=...&sig=...``)
_SECRET = re.compile(
    r"(?i)(?:(?<=%3F)|(?<=%26)|(?<![a-z0-9_-]))(sig|signature|x-goog-signature|x-goog-credential|x-amz-signature|"
    r"x-amz-credential|x-amz-security-token|accountkey|sharedaccesssignature|"
    r"access_token|token)(=|%3D)([^\s&;'\"<>()\[\],]+)"
)


def redact_uri(uri: str) -> str:
    """`uri` as it may be shown: no query string (signatures), no user info (passwords),
    no fragment; a local path is returned as it is.

    Example: ``redact_uri("https://u:p@host:9/c/b?sv=1&sig=S")`` is ``"https://host:9/c/b"``.
    """
    if "://" not in uri:
        return uri.split("?", 1)[0] if "=" in uri.partition("?")[2] else uri
    scheme, rest = uri.split("://", 1)
    authority, slash, path = rest.partition("/")
    authority = authority.rpartition("@")[2].split("?", 1)[0].split("#", 1)[0]
    path = path.split("?", 1)[0].split("#", 1)[0]
    return f"{scheme}://{authority}{slash}{path}"


def _uri_match(match: re.Match[str]) -> str:
    scheme, rest, query = match.group(1), match.group(2), match.group(3)
    if not query and "@" not in rest.partition("/")[0]:
        return match.group(0)
    return redact_uri(scheme + rest)


def redact_text(text: str) -> str:
    """`text` with every URI in it as `redact_uri` shows it, and the value of every secret
    parameter (``sig=``, ``X-Amz-Signature=``, ``X-Goog-Credential=``, ``AccountKey=``...)
    replaced by ``[redacted]``."""
    if "=" not in text and "@" not in text and "%3d" not in text.lower():
        return text
    text = _URI.sub(_uri_match, text)
    return _SECRET.sub(lambda m: f"{m.group(1)}{m.group(2)}{REDACTED}", text)


def has_signed_query(uri: str) -> bool:
    """Whether `uri` carries a query string with a secret parameter (``sig``,
    ``X-Amz-Signature``, ``X-Goog-Signature``...)."""
    query = uri.partition("?")[2]
    return bool(query) and _SECRET.search(query) is not None


class RedactingFilter(logging.Filter):
    """A logging filter that passes every record, its message redacted (`redact_text`)."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a bad format is logging's to report, unchanged
            return True
        clean = redact_text(message)
        if clean != message:
            record.msg, record.args = clean, ()
        if record.exc_info and record.exc_info[1] is not None and not record.exc_text:
            formatted = logging.Formatter().formatException(record.exc_info)
            record.exc_text = redact_text(formatted)
        return True


_FILTER = RedactingFilter()


def scrubbing(logger: logging.Logger | str) -> logging.Logger:
    """`logger` (or the logger of that name) with `RedactingFilter` on it (once), and on
    its handlers: what it logs, and what reaches its handlers from loggers below it (vLLM's
    ``vllm`` logger has its own handler), is redacted."""
    if isinstance(logger, str):
        logger = logging.getLogger(logger)
    for target in (logger, *logger.handlers):
        if _FILTER not in target.filters:
            target.addFilter(_FILTER)
    return logger


_prefixes: set[str] = set()
_prefixes_lock = threading.Lock()


def scrub_records(prefix: str) -> None:
    """Redact every record of the logger `prefix` and the loggers below it as the record is
    made, whatever handler it reaches: a logger's filter sees only its own records, and
    vLLM's loggers (``vllm.*``) log through the ``vllm`` logger's handler, or the root's
    where vLLM's logging is not configured. One record factory, chained to the one in place,
    installed once."""
    with _prefixes_lock:
        if not _prefixes:
            previous = logging.getLogRecordFactory()

            def factory(*args: object, **kwargs: object) -> logging.LogRecord:
                record = previous(*args, **kwargs)
                name = record.name
                if any(name == p or name.startswith(p + ".") for p in _prefixes):
                    _FILTER.filter(record)
                return record

            logging.setLogRecordFactory(factory)
        _prefixes.add(prefix)
