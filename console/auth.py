"""Who may use the console: operators (CONVEYOR_CONSOLE_AUTH) act, viewers
(CONVEYOR_CONSOLE_VIEWERS) only read. Both are `user:password[,user:password...]`, from the
variable or from the file its *_FILE form names (the Docker secrets convention)."""

from __future__ import annotations

import base64
import binascii
import hmac
from dataclasses import dataclass

from monitoring.flower import is_loopback

OPERATOR = "operator"
VIEWER = "viewer"
#: The variable that gives each role its accounts.
VARIABLES = {OPERATOR: "CONVEYOR_CONSOLE_AUTH", VIEWER: "CONVEYOR_CONSOLE_VIEWERS"}


class UnsafeConsoleConfiguration(SystemExit):
    """Raised (and so exiting with its message) when the console's accounts or address are
    wrong: it would otherwise be open to the network, or refuse every user."""


@dataclass(frozen=True)
class Account:
    user: str
    password: str
    role: str


def parse_accounts(value: str, role: str, variable: str) -> list[Account]:
    """`user:password[,user:password...]` as accounts of one role."""
    accounts = []
    for pair in value.split(","):
        user, sep, password = pair.strip().partition(":")
        if not sep or not user or not password:
            raise UnsafeConsoleConfiguration(
                f"{variable} must be user:password pairs separated by commas"
            )
        accounts.append(Account(user, password, role))
    return accounts


def accounts_from_environment() -> list[Account]:
    """Every account given by CONVEYOR_CONSOLE_AUTH and CONVEYOR_CONSOLE_VIEWERS (or *_FILE)."""
    from core.config import optional_secret

    accounts: list[Account] = []
    for role, variable in VARIABLES.items():
        try:
            value = optional_secret(variable)
        except RuntimeError as exc:
            raise UnsafeConsoleConfiguration(f"refusing to start: {exc}") from None
        if value:
            accounts += parse_accounts(value, role, variable)
    users = [account.user for account in accounts]
    if len(set(users)) != len(users):
        raise UnsafeConsoleConfiguration("a console user is listed twice (one role per user)")
    return accounts


def check_access(address: str, accounts: list[Account]) -> None:
    """Exit with the reason when the console would serve the network without authentication."""
    if accounts or is_loopback(address):
        return
    shown = address or "every interface"
    raise UnsafeConsoleConfiguration(
        f"refusing to start: the console would serve {shown} without authentication. Set "
        "CONVEYOR_CONSOLE_AUTH=user:password (and CONVEYOR_CONSOLE_VIEWERS for read-only "
        "users), or bind it to loopback with --address=127.0.0.1."
    )


class Authenticator:
    """Checks HTTP Basic credentials. Without any account (loopback only), everyone is an
    operator named after nothing: whoever reaches a loopback port already runs on the host."""

    def __init__(self, accounts: list[Account]) -> None:
        self.accounts = {account.user: account for account in accounts}

    @property
    def required(self) -> bool:
        return bool(self.accounts)

    def identify(self, authorization: str | None) -> Account | None:
        """The account an Authorization header proves, or None."""
        if not self.accounts:
            return Account("local", "", OPERATOR)
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "basic":
            return None
        try:
            user, _, password = base64.b64decode(token, validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return None
        account = self.accounts.get(user)
        # Compared in constant time, and always compared, so timing tells nothing.
        expected = account.password if account else "\0"
        if hmac.compare_digest(password.encode(), expected.encode()) and account is not None:
            return account
        return None
