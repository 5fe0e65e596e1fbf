"""Shadow mode: a site's validation period; the console classifies and records, and acts on nothing.

With ``HEMOTRIAGE_SHADOW_MODE=true`` every study is classified and stored as
usual, but nothing the model says reaches patient care:

- no alert: the live stream's ``alert`` is always false
  (:func:`console.events.publish_study`), so no banner, sound or notification;
- no worklist boost: the flagged and score weights are 0 (:mod:`console.priority`);
- nothing is sent outward: :attr:`console.services.Services.shadow_mode` is the
  one predicate every outward path (results to PACS, any future notifier)
  checks before queuing or sending;
- results are shown to administrators only (the validation team,
  :func:`results_visible`); other users see that a study was read, not what
  the model said;
- every page says so in a banner.

    app.config["SHADOW_MODE"] = parse_shadow_mode(app.config["SHADOW_MODE"])
    require_results_visible()      # in a view about model results: 403 for non-admins
"""

from __future__ import annotations

from flask import Flask, current_app, g

from console.errors import ForbiddenError

#: Setting values taken as on and off (environment values arrive parsed as JSON or as text).
_ON = (True, 1, "true", "1", "yes", "on")
_OFF = (False, 0, "false", "0", "no", "off", "")


def parse_shadow_mode(value: object) -> bool:
    """The ``SHADOW_MODE`` setting as a bool.

    Raises:
        ValueError: anything but true/false (1/0, yes/no, on/off): a typo must not
            silently turn alerts on at a site that meant to validate first.
    """
    text = value.strip().lower() if isinstance(value, str) else value
    if text in _ON:
        return True
    if text in _OFF:
        return False
    raise ValueError(f"HEMOTRIAGE_SHADOW_MODE must be true or false, not {value!r}")


def results_visible() -> bool:
    """Whether this request's user sees model results: always, or only admins in shadow mode."""
    return not current_app.config["SHADOW_MODE"] or g.role == "admin"


def require_results_visible() -> None:
    """Refuse a request about model results (judging one, a Grad-CAM) from one who cannot see them.

    Raises:
        ForbiddenError: shadow mode, and the user is not an administrator.
    """
    if not results_visible():
        raise ForbiddenError("shadow mode: model results are for administrators only")


def init_app(app: Flask) -> None:
    """Give every template ``shadow_mode``, for the banner on each page."""
    app.context_processor(lambda: {"shadow_mode": current_app.config["SHADOW_MODE"]})
