"""Why a plain form post was refused, carried across the 303 that answers it.

Without JavaScript, a refused form post is answered like an accepted one: a
``303`` back to the page the form is on, so the address bar shows a page
that reloads without posting again. The reason rides along in that page's
query string (``?refused=...``), signed and dated with :mod:`itsdangerous`,
and the page shows it. A page shows only a message this app signed, for
this client, in the last :data:`MAX_AGE` seconds: a link made by someone
else can put no text of theirs on it.

The key is Flask's ``SECRET_KEY`` when it is set, else a random one made
when this module is first imported. gunicorn (gunicorn.conf.py) imports the
app in its master before forking the workers, so every worker process of one
server shares that key, and a refusal signed in one verifies in another.
Processes that share no parent (uWSGI's lazy apps, servers on several
machines) share a key only through ``SECRET_KEY``; without it, a page that
cannot verify what it was given says only that an action was refused, and
the server log has the reason.

No session and no cookie: Flask's session needs ``SECRET_KEY``, and a
cookie would show the message in whichever tab loads next.
"""

from __future__ import annotations

import logging
import secrets

from flask import current_app, request
from itsdangerous import BadData, SignatureExpired, URLSafeTimedSerializer

from .security import printable

logger = logging.getLogger("dashboard.notices")

#: The query parameter that carries a signed refusal.
PARAM = "refused"
#: The query parameter that carries what a plain form post did ("312 tasks retried as
#: #5001–#5312"), signed the same way under a salt of its own.
DONE = "done"
#: Seconds a signed refusal is shown for: a reload soon after shows it again,
#: a bookmark or an old tab later shows nothing.
MAX_AGE = 300
#: The most characters of a message carried (a refusal quotes what it was given briefly).
MAX_CHARS = 500
#: What a page says when it was given a refusal it cannot verify: never the text itself.
UNVERIFIED = (
    "An action was refused, but why cannot be shown here: the link that said so was not "
    "signed by this server for this browser. The server log has the reason."
)

_SALT = "dashboard.refused"
#: The key when the app sets no SECRET_KEY: made at import (see the module's doc).
_PROCESS_KEY = secrets.token_bytes(32)


def _serializer() -> URLSafeTimedSerializer:
    key = current_app.config.get("SECRET_KEY") or _PROCESS_KEY
    if not isinstance(key, (str, bytes)):
        key = str(key)  # FLASK_SECRET_KEY=12345... arrives as a number
    return URLSafeTimedSerializer(key, salt=_SALT)


def _client_salt(param: str = PARAM) -> str:
    """Binds a message to the client it was written for (another cannot be shown it) and
    to the parameter it is for (a refusal cannot be shown as what was done)."""
    salt = _SALT if param == PARAM else f"{_SALT}.{param}"
    return f"{salt} {request.remote_addr or ''}"


def sign(message: str, param: str = PARAM) -> str:
    """``message`` as a token for ``param`` (:data:`PARAM` or :data:`DONE`), for this
    client."""
    return _serializer().dumps(printable(message, MAX_CHARS), salt=_client_salt(param))


def read_done(token: str | None) -> str | None:
    """What a plain form post did, from :data:`DONE`: only a line this app signed for this
    client in the last :data:`MAX_AGE` seconds; nothing otherwise."""
    if not token:
        return None
    try:
        message = _serializer().loads(token, max_age=MAX_AGE, salt=_client_salt(DONE))
    except BadData:
        return None
    return message if isinstance(message, str) else None


def read(token: str | None) -> str | None:
    """The message a token carries; None when there is none, or it is too old to show.

    A token this app did not sign for this client gives :data:`UNVERIFIED`.
    """
    if not token:
        return None
    try:
        message = _serializer().loads(token, max_age=MAX_AGE, salt=_client_salt())
    except SignatureExpired:
        return None
    except BadData:  # not ours, not for this client, or tampered with
        logger.info("a refusal message that does not verify was not shown (%s); set "
                    "SECRET_KEY if processes that share no parent serve this app",
                    printable(token, 60))
        return UNVERIFIED
    return message if isinstance(message, str) else UNVERIFIED
