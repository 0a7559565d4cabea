"""The models the drift scenario's revisions build (d001-d003): what `migrate-job drift` compares with."""

from sqlalchemy import Column, ForeignKey, Index, Integer, MetaData, String, Table, Text, UniqueConstraint

metadata = MetaData()

authors = Table(
    "authors", metadata,
    Column("id", Integer, primary_key=True),
    Column("name", String(100), nullable=False),
    Column("email", String(200), nullable=False),
    UniqueConstraint("email", name="uq_authors_email"),
)

books = Table(
    "books", metadata,
    Column("id", Integer, primary_key=True),
    Column("author_id", Integer, ForeignKey("authors.id", name="fk_books_author"), nullable=False),
    Column("title", Text, nullable=False),
    Column("isbn", String(20)),
    Index("ix_books_title", "title"),
)
