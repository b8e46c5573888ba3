/** A small least-recently-used map: Map keeps insertion order, so a hit is re-inserted. */
export class Lru<K, V> {
  readonly #map = new Map<K, V>()
  constructor(readonly size: number) {}
  /** How many entries it holds. */
  get count(): number {
    return this.#map.size
  }
  get(key: K): V | undefined {
    const value = this.#map.get(key)
    if (value !== undefined) {
      this.#map.delete(key)
      this.#map.set(key, value)
    }
    return value
  }
  delete(key: K): void {
    this.#map.delete(key)
  }
  set(key: K, value: V): void {
    this.#map.delete(key)
    this.#map.set(key, value)
    if (this.#map.size > this.size) this.#map.delete(this.#map.keys().next().value as K)
  }
}
