-- Retention deletes a handled message's deliveries and its inbox row itself,
-- in one statement per batch. The foreign key from deliveries to the inbox
-- cost a trigger per row both ways: its check on every delivery the consumer
-- inserts (a quarter of the consumer's insert time, issue 11) and its cascade
-- on every inbox row pruned (pruning beside the pipeline took 17-25% of its
-- throughput, issue 12). Deliveries are only ever made with their inbox row,
-- in the same transaction, and pruned with it.
ALTER TABLE deliveries DROP CONSTRAINT IF EXISTS deliveries_message_id_fkey;
