-- The e-commerce checkout demo domain used by tests, drills and `make demo`:
-- orders (last-writer-wins), inventory (merge: stock is a counter, tags a set),
-- payments (manual queue). Created by `reconciler migrate --demo-tables`.
CREATE TABLE IF NOT EXISTS public.orders (
    id          text PRIMARY KEY,
    customer    text NOT NULL,
    status      text NOT NULL,
    total_cents bigint NOT NULL,
    note        text
);

CREATE TABLE IF NOT EXISTS public.inventory (
    sku         text PRIMARY KEY,
    name        text,
    stock       bigint NOT NULL DEFAULT 0,
    tags        jsonb NOT NULL DEFAULT '[]',
    price_cents bigint
);

CREATE TABLE IF NOT EXISTS public.payments (
    id           text PRIMARY KEY,
    order_id     text NOT NULL,
    amount_cents bigint NOT NULL,
    status       text NOT NULL
);
