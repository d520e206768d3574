"""Credit purchases from payment webhooks, credited exactly once per (provider, payment_reference)."""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass
from datetime import datetime

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from mediavault.domain import accounts
from mediavault.domain.pages import PageTokens, page_size
from mediavault.errors import FieldViolation, IdempotencyConflict, InternalError, InvalidArgument

PROVIDERS = ("stripe", "solana", "manual")
MAX_PAGE_SIZE = 100
DEFAULT_PAGE_SIZE = 50
MAX_PAYMENT_REFERENCE = 256
# A quota is the free tier plus every credit, summed in a bigint: at 1 PiB per credit, more
# than any plan sells, an account needs over 8000 of the largest before 2**63 comes near.
MAX_CREDIT_BYTES = 2**50
# The name the purchase list's page tokens are signed under.
LISTING = "purchases"
_CURRENCY = re.compile(r"[A-Z0-9]{3,10}")

_COLUMNS = "purchase_id, user_id, provider, payment_reference, credit_bytes, amount_minor, currency, created_at"

# ON CONFLICT DO NOTHING waits for a concurrent insert of the same payment to commit
# and then inserts nothing, so 100 simultaneous deliveries of one webhook credit once.
_CREDIT = f"""
WITH purchase AS (
    INSERT INTO purchases (purchase_id, user_id, provider, payment_reference, credit_bytes, amount_minor, currency)
    VALUES ($1, $2, $3, $4, $5, $6, $7)
    ON CONFLICT (provider, payment_reference) DO NOTHING
    RETURNING {_COLUMNS}
), credited AS (
    UPDATE accounts a SET quota_bytes = a.quota_bytes + p.credit_bytes, updated_at = now()
    FROM purchase p WHERE a.user_id = p.user_id
), entry AS (
    INSERT INTO ledger_entries (user_id, kind, quota_delta, purchase_id)
    SELECT user_id, 'purchase', credit_bytes, purchase_id FROM purchase
)
SELECT * FROM purchase
"""

_BY_REFERENCE = f"SELECT {_COLUMNS} FROM purchases WHERE provider = $1 AND payment_reference = $2"


# Two statements for the reason of media's feed pages (media._page_statement): a cursor that may
# be NULL does not bound the index scan of a generic plan.
def _page_statement(after: str, limit: str) -> str:
    return f"""
SELECT {_COLUMNS} FROM purchases
WHERE user_id = $1{after}
ORDER BY created_at DESC, purchase_id DESC
LIMIT {limit}
"""


_FIRST_PAGE = _page_statement("", "$2")
_PAGE_AFTER = _page_statement(" AND (created_at, purchase_id) < ($2, $3)", "$4")


@dataclass(frozen=True)
class Purchase:
    purchase_id: uuid.UUID
    user_id: str
    provider: str
    payment_reference: str
    credit_bytes: int
    amount_minor: int
    currency: str
    created_at: datetime


@dataclass(frozen=True)
class CreditRequest:
    user_id: str
    provider: str
    payment_reference: str
    credit_bytes: int
    amount_minor: int
    currency: str


@dataclass(frozen=True)
class CreditResult:
    purchase: Purchase
    already_processed: bool
    summary: accounts.StorageSummary


def _validate(request: CreditRequest) -> None:
    """The rules beyond the fields' limits, which are declared at the boundary (rpc.fields)."""
    violations = []
    if request.provider not in PROVIDERS:
        violations.append(FieldViolation("provider", "must be STRIPE, SOLANA or MANUAL"))
    if not _CURRENCY.fullmatch(request.currency):
        violations.append(FieldViolation("currency", "must be an upper-case currency code such as USD or SOL"))
    if violations:
        raise InvalidArgument(violations)


def _matches(purchase: Purchase, request: CreditRequest) -> bool:
    return (
        purchase.user_id == request.user_id
        and purchase.credit_bytes == request.credit_bytes
        and purchase.amount_minor == request.amount_minor
        and purchase.currency == request.currency
    )


class Purchases:
    """Credits bought through payment webhooks; each payment credits its account once."""

    def __init__(self, pool: asyncpg.Pool, accounts: accounts.Accounts, tokens: PageTokens) -> None:
        self._pool = pool
        self._accounts = accounts
        self._tokens = tokens

    async def add_credits(self, request: CreditRequest) -> CreditResult:
        """Credits the payment, or answers the first crediting of it again; with the account's figures after."""
        _validate(request)
        # One transaction, so that a refused call leaves nothing behind: not even the account of a
        # user the payment was not for, made before the payment's reference could be checked.
        # READ COMMITTED: _first_crediting must see the conflicting purchase the insert waited for.
        async with self._pool.acquire() as conn, conn.transaction(isolation="read_committed"):
            await accounts.ensure(conn, request.user_id, self._accounts.free_quota_bytes)
            try:
                row = await conn.fetchrow(
                    _CREDIT,
                    uuid.uuid4(),
                    request.user_id,
                    request.provider,
                    request.payment_reference,
                    request.credit_bytes,
                    request.amount_minor,
                    request.currency,
                )
            except asyncpg.NumericValueOutOfRangeError:
                # Only an account already holding nearly 2**63 bytes of quota gets here (see MAX_CREDIT_BYTES).
                raise InvalidArgument.single("credit_bytes", "would take the account's quota past the largest it can hold") from None
            if row is not None:
                purchase, already_processed = Purchase(**row), False
            else:
                purchase, already_processed = await self._first_crediting(conn, request), True
        return CreditResult(purchase, already_processed, await self._accounts.summary(request.user_id))

    async def _first_crediting(self, conn: PoolConnectionProxy, request: CreditRequest) -> Purchase:
        # Purchases are never deleted, so the row that conflicted is there.
        conflicting = await conn.fetchrow(_BY_REFERENCE, request.provider, request.payment_reference)
        if conflicting is None:
            raise InternalError("the conflicting purchase is gone")
        existing = Purchase(**conflicting)
        if not _matches(existing, request):
            raise IdempotencyConflict("payment_reference was already credited with different details")
        return existing

    async def list_page(self, user_id: str, requested_size: int, page_token: str) -> tuple[list[Purchase], str]:
        """One page, newest first, keyset-paginated so new purchases never shift a page."""
        size = page_size(requested_size, DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        if page_token:
            rows = await self._pool.fetch(_PAGE_AFTER, user_id, *self._tokens.decode(LISTING, user_id, page_token), size + 1)
        else:
            rows = await self._pool.fetch(_FIRST_PAGE, user_id, size + 1)
        purchases = [Purchase(**r) for r in rows[:size]]
        last = purchases[-1] if len(rows) > size else None
        return purchases, self._tokens.encode(LISTING, user_id, last.created_at, last.purchase_id) if last else ""
