"""A small FastAPI API over the blog: CRUD for users, posts and comments, plus health endpoints.

`/readyz` answers 503 until the database is at the migrations' head, using the job's own check,
so a pod never serves against a schema it does not expect.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from functools import lru_cache

import psycopg2
from fastapi import Depends, FastAPI, HTTPException, Response
from pydantic import BaseModel, ConfigDict
from sqlalchemy import create_engine, select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker

from app.models import Comment, Post, User
from job import config as job_config
from job import commands
from job.errors import JobError

app = FastAPI(title="blog")


@lru_cache
def settings() -> job_config.Settings:
    """The job's settings from this pod's environment, with short waits for a probe."""
    return job_config.load(os.environ, {"wait_timeout": 2})


@lru_cache
def engine() -> Engine:
    s = settings()
    return create_engine(
        "postgresql+psycopg2://",
        creator=lambda: psycopg2.connect(**s.database.connect_kwargs("blog")),
        pool_pre_ping=True,
    )


def session() -> Iterator[Session]:
    with sessionmaker(engine())() as db:
        yield db


class UserIn(BaseModel):
    email: str
    full_name: str
    role: str = "member"


class UserOut(UserIn):
    model_config = ConfigDict(from_attributes=True)
    id: int


class PostIn(BaseModel):
    user_id: int
    title: str
    body: str


class PostOut(PostIn):
    model_config = ConfigDict(from_attributes=True)
    id: int


class CommentIn(BaseModel):
    user_id: int
    body: str


class CommentOut(CommentIn):
    model_config = ConfigDict(from_attributes=True)
    id: int
    post_id: int


@app.get("/healthz")
def healthz() -> dict[str, str]:
    return {"status": "ok"}


@app.get("/readyz")
def readyz(response: Response) -> dict[str, object]:
    try:
        the_plan = commands.check(settings())
    except JobError as e:
        response.status_code = 503
        return {"ready": False, "error": str(e)}
    ready = not the_plan.pending
    if not ready:
        response.status_code = 503
    return {"ready": ready, "current": list(the_plan.current), "pending": len(the_plan.pending)}


@app.post("/users", response_model=UserOut, status_code=201)
def create_user(body: UserIn, db: Session = Depends(session)) -> User:
    user = User(**body.model_dump())
    db.add(user)
    db.commit()
    return user


@app.get("/users", response_model=list[UserOut])
def list_users(db: Session = Depends(session)) -> list[User]:
    return list(db.scalars(select(User).order_by(User.id)))


@app.get("/users/{user_id}", response_model=UserOut)
def get_user(user_id: int, db: Session = Depends(session)) -> User:
    return _get(db, User, user_id)


@app.delete("/users/{user_id}", status_code=204)
def delete_user(user_id: int, db: Session = Depends(session)) -> None:
    db.delete(_get(db, User, user_id))
    db.commit()


@app.post("/posts", response_model=PostOut, status_code=201)
def create_post(body: PostIn, db: Session = Depends(session)) -> Post:
    _get(db, User, body.user_id)
    post = Post(**body.model_dump())
    db.add(post)
    db.commit()
    return post


@app.get("/posts", response_model=list[PostOut])
def list_posts(db: Session = Depends(session)) -> list[Post]:
    return list(db.scalars(select(Post).order_by(Post.id)))


@app.get("/posts/{post_id}", response_model=PostOut)
def get_post(post_id: int, db: Session = Depends(session)) -> Post:
    return _get(db, Post, post_id)


@app.delete("/posts/{post_id}", status_code=204)
def delete_post(post_id: int, db: Session = Depends(session)) -> None:
    db.delete(_get(db, Post, post_id))
    db.commit()


@app.post("/posts/{post_id}/comments", response_model=CommentOut, status_code=201)
def create_comment(post_id: int, body: CommentIn, db: Session = Depends(session)) -> Comment:
    _get(db, Post, post_id)
    _get(db, User, body.user_id)
    comment = Comment(post_id=post_id, **body.model_dump())
    db.add(comment)
    db.commit()
    return comment


@app.get("/posts/{post_id}/comments", response_model=list[CommentOut])
def list_comments(post_id: int, db: Session = Depends(session)) -> list[Comment]:
    _get(db, Post, post_id)
    return list(db.scalars(select(Comment).where(Comment.post_id == post_id).order_by(Comment.id)))


def _get(db: Session, model: type, key: int) -> object:
    found = db.get(model, key)
    if found is None:
        raise HTTPException(status_code=404, detail=f"{model.__name__.lower()} {key} not found")
    return found
