"""Generate tanuki's bundled instruction data: ``sft.jsonl`` (training conversations) and
``sft_eval.jsonl`` (held-out prompts with exact answers), deterministically.

The conversations are Japanese and English, written for tanuki (no public dataset is copied):

* task families whose answers can be checked exactly, built from the same word banks as the
  pretraining corpus (``make_corpus.py``), so a tiny model pretrained on ``corpus.jsonl`` has seen the
  facts and only has to learn to answer: word problems (+, -, x), which number is larger, unit
  conversions, prefecture and country capitals, kanji readings, English past tenses, translations
  of the corpus's sentence pairs, katakana -> hiragana, writing a word backwards, counting characters;
* short hand-written questions and answers (greetings, facts, advice, small writing tasks);
* multi-turn conversations (a task and a thank-you, two tasks in a row, a question and a follow-up).

Records are in both accepted formats: ``{"messages": [...]}`` (with or without a system message) and
Alpaca style ``{"instruction", "input", "output"}``.

Held-out evaluation: for every checkable family some keys (a pair of numbers, a word, a prefecture,
...) are drawn first and never used for training; ``sft_eval.jsonl`` asks about exactly those. Each
eval record is ``{"messages": [... ending with the user turn], "answer": "...", "task": "..."}``, and
a prediction is right when it equals ``answer`` (``tanuki.data.sft.exact_match``). Eval prompts come
in the same shapes as the training prompts of their family.

    python scripts/sample_data/make_sft.py                # rewrite sft.jsonl and sft_eval.jsonl
    python scripts/sample_data/make_sft.py --out-dir /tmp/sft --train 5000 --seed 1

The same arguments always give the same bytes.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

HERE = Path(__file__).resolve().parent
#: the package's sample data (``tanuki/sample_data/``): where the generated files go by default
DATA = HERE.parents[1] / "tanuki" / "sample_data"
SAMPLE_SEED = 0
#: training conversations and held-out eval prompts of the committed files
SAMPLE_TRAIN = 2000
SAMPLE_EVAL = 100

# The Japanese Alpaca system sentences (the same strings as tanuki.tokenizer.templates; repeated so
# that this script runs on its own)
SYSTEM_JA = "以下は、タスクを説明する指示です。要求を適切に満たす応答を書きなさい。"
SYSTEM_JA_INPUT = "以下は、タスクを説明する指示と、文脈のある入力の組み合わせです。要求を適切に満たす応答を書きなさい。"
INPUT_HEADER = "\n\n### 入力:\n"


def _load_corpus_module():
    spec = importlib.util.spec_from_file_location("tanuki_make_corpus", HERE / "make_corpus.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


C = _load_corpus_module()

# --------------------------------------------------------------------------------------------------
# Word banks (beyond those of make_corpus.py)
# --------------------------------------------------------------------------------------------------

# things to count: (Japanese, counter)
OBJECTS_JA = [("りんご", "個"), ("みかん", "個"), ("あめ", "個"), ("たまご", "個"), ("えんぴつ", "本"), ("花", "本"),
              ("色紙", "枚"), ("クッキー", "枚"), ("シール", "枚"), ("ノート", "冊"), ("本", "冊"), ("ボール", "個")]
OBJECTS_EN = ["apples", "marbles", "pencils", "stickers", "cookies", "books", "stamps", "shells"]

KATAKANA_WORDS = """
コーヒー テレビ パン ラジオ カメラ ノート ペン バス タクシー ホテル レストラン スープ ケーキ チーズ バナナ トマト
メロン レモン ピアノ ギター サッカー テニス ゴルフ スキー プール デパート スーパー パソコン メール ニュース ドラマ
アニメ ゲーム カレー ラーメン サラダ ジュース ミルク アイス シャツ ズボン スカート ベッド テーブル ソファ カーテン
ドア キッチン トイレ シャワー タオル ボール ロボット ロケット ボート チケット プログラム ファイル サーバー データ
キーボード スプーン フォーク カレンダー エレベーター インターネット サンドイッチ マラソン ハンバーグ オレンジ
""".split()

HIRAGANA_WORDS = """
たぬき きつね さくら うさぎ りんご みかん すいか いちご ねこ いぬ とり さかな やま かわ うみ そら ほし つき はな
くるま でんしゃ がっこう としょかん えんぴつ かばん てがみ あさがお ひまわり たけのこ おにぎり みそしる ゆきだるま
かぶとむし とんぼ かたつむり どんぐり もみじ つくえ いす まど とけい くつした ぼうし めがね はさみ のりもの
""".split()

ENGLISH_WORDS = """
tanuki forest river apple train school window garden pencil music summer winter planet rabbit bridge coffee market
letter island doctor yellow orange kitchen flower mountain ticket camera number dragon silver basket candle
""".split()

THANKS_JA = [("ありがとうございます。", "どういたしまして。ほかにも聞きたいことがあれば、いつでもどうぞ。"),
             ("ありがとう。よく分かりました。", "お役に立ててうれしいです。"),
             ("助かりました。", "どういたしまして。またいつでも聞いてください。")]
THANKS_EN = [("Thank you!", "You're welcome. Let me know if you have another question."),
             ("Thanks, that helps.", "Glad it helped."),
             ("Great, thanks.", "You're welcome.")]

SYSTEMS_JA = ["あなたは親切なアシスタントです。", "あなたは質問に短く正確に答えるアシスタントです。"]
SYSTEMS_EN = ["You are a helpful assistant.", "You are a concise assistant. Answer briefly and exactly."]

# Hand-written questions and answers: (question, answer)
GENERAL_JA = [
    ("たぬきはどんな動物ですか。",
     "たぬきはイヌ科の動物です。日本では山や森だけでなく、町の近くにもすんでいます。夜に活動することが多く、木の実や虫などいろいろなものを食べます。"),
    ("日本の四季について簡単に説明してください。",
     "日本には春、夏、秋、冬の四つの季節があります。春は桜、夏は祭りや花火、秋は紅葉、冬は雪景色が楽しめます。"),
    ("よく眠るためのこつを三つ教えてください。",
     "1. 毎日同じ時間に寝て、同じ時間に起きる。\n2. 寝る前はスマートフォンの画面を見ない。\n3. 夕方からはコーヒーなどを控える。"),
    ("プログラミングを始めたいです。何から始めればいいですか。",
     "まずは Python のような読みやすい言語を一つ選び、小さなプログラムを毎日書いてみましょう。計算や文字の表示から始めて、少しずつ条件分岐や繰り返しに進むと分かりやすいです。"),
    ("自己紹介をしてください。",
     "こんにちは。私はたぬきという名前の小さな言語モデルです。日本語と英語で質問に答えたり、簡単な作業を手伝ったりします。"),
    ("富士山の高さはどれくらいですか。", "富士山の高さは3,776メートルで、日本でいちばん高い山です。"),
    ("水は何度で沸騰しますか。", "1気圧のもとでは、水は100度で沸騰します。"),
    ("一年は何日ありますか。", "ふつうの年は365日、うるう年は366日です。"),
    ("雨の日のおすすめの過ごし方を教えてください。",
     "家で本を読んだり、料理に挑戦したりするのはいかがでしょうか。図書館や美術館へ出かけるのもおすすめです。"),
    ("「ありがとう」を英語で言うと何ですか。", "「ありがとう」は英語で Thank you です。"),
    ("朝ごはんを食べるとどんないいことがありますか。",
     "朝ごはんを食べると体が目を覚まし、午前中に集中しやすくなります。一日の生活のリズムも整います。"),
    ("日本でいちばん長い川は何ですか。", "日本でいちばん長い川は信濃川です。"),
    ("地球から月までの距離はどれくらいですか。", "地球から月までは、平均でおよそ38万キロメートルです。"),
    ("野菜を食べるのが苦手です。どうすればいいですか。",
     "スープやカレーに細かく切って入れると食べやすくなります。まずは好きな野菜を一つ見つけることから始めてみましょう。"),
    ("俳句とは何ですか。", "俳句は五・七・五の十七音で作る日本の短い詩です。ふつう季節を表す言葉である季語を入れます。"),
    ("「春」をテーマに短い文を書いてください。", "桜の花が咲き、やわらかな風が吹いてきました。新しい季節の始まりに、心も軽くなります。"),
    ("おすすめの勉強の仕方を教えてください。",
     "短い時間に区切って集中し、終わったら習ったことを自分の言葉で説明してみましょう。次の日に少し復習すると、よく覚えられます。"),
    ("電車の中で気をつけるマナーは何ですか。",
     "大きな声で話さない、リュックは前に持つ、お年寄りや体の不自由な人に席をゆずる、などに気をつけましょう。"),
    ("パソコンの動きが遅いときはどうすればいいですか。",
     "まず使っていないアプリを閉じて、再起動してみましょう。それでも遅いときは、空き容量が少なくなっていないか確かめてください。"),
    ("虹は何色ですか。", "日本ではふつう、虹は赤、橙、黄、緑、青、藍、紫の七色だといわれます。"),
    ("カレーライスの作り方を簡単に教えてください。",
     "1. 肉と野菜を一口大に切る。\n2. 鍋で炒めてから水を入れて煮る。\n3. 火を止めてルウを溶かし、とろみがつくまで煮込む。\n4. ご飯にかけてできあがりです。"),
    ("落ち込んでいるときはどうしたらいいですか。",
     "無理をせず、まずはゆっくり休みましょう。散歩をしたり、信頼できる人に話を聞いてもらったりすると、気持ちが少し楽になることがあります。"),
    ("なぜ空は青いのですか。", "太陽の光が空気の分子に当たると、青い光がほかの色よりも多く散らばります。そのため空は青く見えます。"),
    ("たぬきとアライグマの違いは何ですか。",
     "たぬきはイヌ科、アライグマはアライグマ科の動物です。アライグマにはしっぽにしまもようがありますが、たぬきにはありません。"),
    ("夏バテを防ぐにはどうすればいいですか。", "水分をこまめにとり、よく眠り、栄養のある食事をとることが大切です。冷たいものの食べすぎにも気をつけましょう。"),
    ("関数とは何ですか。", "関数は、決まった処理に名前をつけてまとめたものです。引数を受け取り、結果を戻り値として返します。"),
    ("変数とは何ですか。", "変数は、値に名前をつけて入れておく箱のようなものです。あとでその名前を使って値を読んだり書きかえたりできます。"),
    ("お正月にはどんなことをしますか。", "家族でおせち料理やお雑煮を食べたり、神社へ初もうでに行ったりします。子どもはお年玉をもらうこともあります。"),
    ("七夕はどんな行事ですか。", "七夕は七月七日の行事です。願いごとを書いた短冊を笹に飾ります。"),
    ("今日は何をしたらいいか分かりません。", "天気がよければ近くを散歩してみてはいかがでしょうか。家にいるなら、読みかけの本を少し読むのもおすすめです。"),
    ("日本語を勉強している友だちにすすめる方法はありますか。",
     "好きなアニメや歌を日本語で楽しみながら、ひらがなとカタカナを先に覚えるのがおすすめです。毎日少しずつ続けることが大切です。"),
    ("健康のために毎日できることを教えてください。", "よく歩くこと、野菜を食べること、水をしっかり飲むこと、そして早く寝ることです。"),
    ("「猫の手も借りたい」とはどういう意味ですか。", "とても忙しくて、だれでもいいから手伝ってほしい、という意味です。"),
    ("「三日坊主」とはどういう意味ですか。", "何かを始めても、すぐにあきてやめてしまうことや、そういう人のことです。"),
    ("良い一日を過ごすための朝の習慣を一つ教えてください。", "起きたらまずコップ一杯の水を飲み、窓を開けて日の光を浴びてみましょう。"),
    ("会議の前に準備することは何ですか。", "会議の目的を確かめ、資料に目を通し、自分が話したいことを短くまとめておきましょう。"),
]

GENERAL_EN = [
    ("What is a tanuki?",
     "A tanuki is a wild animal of the dog family that lives in Japan. It is active mostly at night and eats fruit, nuts and insects."),
    ("Give me three tips for sleeping well.",
     "1. Go to bed and get up at the same time every day.\n2. Put your phone away before bed.\n3. Avoid coffee in the evening."),
    ("How do I start learning to program?",
     "Pick one readable language such as Python and write a small program every day. Start with printing and arithmetic, then move on to conditions and loops."),
    ("Introduce yourself.", "Hello! I am Tanuki, a small language model. I answer questions and help with simple tasks in Japanese and English."),
    ("What is the highest mountain in Japan?", "Mount Fuji is the highest mountain in Japan, at 3,776 meters."),
    ("At what temperature does water boil?", "At normal air pressure, water boils at 100 degrees Celsius."),
    ("How many days are there in a year?", "A normal year has 365 days, and a leap year has 366."),
    ("What is a haiku?", "A haiku is a short Japanese poem of seventeen sounds in three parts of five, seven and five. It usually includes a word for a season."),
    ("Why is the sky blue?", "Sunlight is scattered by the molecules of the air, and blue light is scattered more than the other colors, so the sky looks blue."),
    ("What should I do when my computer is slow?", "Close the programs you are not using and restart the computer. If it is still slow, check that the disk is not almost full."),
    ("Suggest something to do on a rainy day.", "You could read a book, try cooking a new dish, or visit a library or a museum."),
    ("What is a function in programming?", "A function is a named piece of code that does one job. It takes arguments and returns a result."),
    ("What is a variable?", "A variable is a name that holds a value, so you can read or change the value later by using the name."),
    ("How do I say \"thank you\" in Japanese?", "You say \"arigatou\" (ありがとう), or more politely \"arigatou gozaimasu\"."),
    ("Write a short sentence about autumn.", "The leaves turn red and gold, and the evening air smells of rain."),
    ("How can I remember new words better?", "Review them the next day, use them in your own sentences, and study a little every day instead of a lot at once."),
    ("What is the difference between a tanuki and a raccoon?", "A tanuki belongs to the dog family, while a raccoon does not. A raccoon also has a striped tail, and a tanuki does not."),
    ("Give me a tip for a good morning.", "Drink a glass of water when you wake up, then open the curtains and let the sunlight in."),
    ("How far is the Moon from the Earth?", "The Moon is about 384,000 kilometers from the Earth on average."),
    ("What should I prepare before a meeting?", "Check the goal of the meeting, read the documents, and write down in a few lines what you want to say."),
    ("I feel a bit down today. Any advice?", "Be kind to yourself and rest. A short walk or a talk with someone you trust can help you feel a little better."),
    ("What is a loop in programming?", "A loop repeats a block of code, either a fixed number of times or while a condition is true."),
    ("What is Tanabata?", "Tanabata is a Japanese festival on July 7. People write wishes on strips of paper and hang them on bamboo."),
    ("How can I stay healthy?", "Walk every day, eat vegetables, drink enough water and go to bed early."),
    ("Explain what a dictionary is in Python.", "A dictionary maps keys to values. You look up a value by its key, for example ages[\"Emma\"]."),
    ("What does \"saving a file\" mean?", "It means writing the current contents to the disk, so that they are still there after you close the program."),
    ("Recommend a way to learn Japanese.", "Learn hiragana and katakana first, then enjoy songs or shows in Japanese and practice a little every day."),
]

# Small writing tasks with an input (Alpaca style with "input")
REWRITES_JA = [
    ("次の文をていねいな言い方に直してください。", "明日来て。", "明日来てください。"),
    ("次の文をていねいな言い方に直してください。", "これ、いくら？", "これはいくらですか。"),
    ("次の文をていねいな言い方に直してください。", "ちょっと待って。", "少々お待ちください。"),
    ("次の文をていねいな言い方に直してください。", "駅はどこ？", "駅はどこですか。"),
    ("次の文を要約してください。", "今日は朝から雨が降っていた。傘を持って出かけたが、昼には晴れて暑くなった。帰りは傘を持って歩くのが大変だった。",
     "雨の朝に傘を持って出かけたが、昼に晴れて傘がじゃまになった。"),
    ("次の文を要約してください。", "たぬきは夜になると森から出てきて、畑の近くで食べ物を探す。朝になる前には森へ帰っていく。",
     "たぬきは夜に森から出て食べ物を探し、朝の前に帰る。"),
    ("次の文の季節を答えてください。", "桜が満開になり、新しいクラスが始まった。", "春です。"),
    ("次の文の季節を答えてください。", "セミが鳴き、海水浴に出かけた。", "夏です。"),
    ("次の文の季節を答えてください。", "もみじが赤く色づき、月見をした。", "秋です。"),
    ("次の文の季節を答えてください。", "雪が積もり、こたつでみかんを食べた。", "冬です。"),
]
REWRITES_EN = [
    ("Rewrite the sentence politely.", "Give me the salt.", "Could you pass me the salt, please?"),
    ("Rewrite the sentence politely.", "Close the window.", "Would you mind closing the window?"),
    ("Summarize the text in one sentence.", "It rained all morning, so we stayed inside and played cards. In the afternoon the sun came out and we went to the park.",
     "We played cards during the morning rain and went to the park when the sun came out."),
    ("Which season is described?", "The leaves are falling and the nights are getting longer.", "Autumn."),
    ("Which season is described?", "We went swimming in the sea and ate watermelon.", "Summer."),
    ("Fix the spelling mistake.", "I like to eat bananna.", "I like to eat banana."),
]

# --------------------------------------------------------------------------------------------------
# Checkable task families
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Item:
    """One question: ``instruction`` (+ ``input`` for transformations) and its exact answer."""

    task: str
    lang: str
    instruction: str
    answer: str
    input: str = ""

    def user_text(self) -> str:
        """The user turn of a ``messages`` record (instruction and input on separate lines)."""
        return f"{self.instruction}\n{self.input}" if self.input else self.instruction


@dataclass(frozen=True)
class Family:
    """A checkable task: its keys (what is held out) and how to ask about one key."""

    name: str
    weight: float
    keys: Callable[[], list]
    make: Callable[[random.Random, object], Item]
    #: eval prompts drawn from held-out keys
    n_eval: int
    #: families of one group share their held-out keys (the same fact asked in two ways)
    group: str = ""


def _to_hiragana(word: str) -> str:
    # Katakana U+30A1..U+30F6 sit exactly 0x60 above their hiragana; the long-vowel mark stays.
    return "".join(chr(ord(c) - 0x60) if "\u30a1" <= c <= "\u30f6" else c for c in word)


def _add_ja(rng, key):
    a, b = key
    obj, c = rng.choice(OBJECTS_JA)
    name = rng.choice(C.NAMES_JA)
    q = rng.choice([
        f"{obj}が{a}{c}あります。{b}{c}もらうと、全部で何{c}になりますか。",
        f"{name}さんは{obj}を{a}{c}持っています。{b}{c}もらいました。全部で何{c}になりましたか。",
        f"{obj}が{a}{c}と{b}{c}あります。合わせて何{c}ですか。",
    ])
    return Item("add_ja", "ja", q, f"{a + b}{c}です。")


def _sub_ja(rng, key):
    a, b = key
    obj, c = rng.choice(OBJECTS_JA)
    name = rng.choice(C.NAMES_JA)
    q = rng.choice([
        f"{obj}が{a}{c}あります。{b}{c}使うと、残りは何{c}ですか。",
        f"{name}さんは{obj}を{a}{c}持っています。{b}{c}あげると、何{c}残りますか。",
    ])
    return Item("sub_ja", "ja", q, f"{a - b}{c}です。")


def _mul_ja(rng, key):
    a, b = key
    obj, c = rng.choice(OBJECTS_JA)
    q = rng.choice([
        f"1ふくろに{obj}が{a}{c}ずつ入っています。{b}ふくろでは全部で何{c}ですか。",
        f"{b}人に{obj}を{a}{c}ずつ配ります。{obj}は全部で何{c}いりますか。",
    ])
    return Item("mul_ja", "ja", q, f"{a * b}{c}です。")


def _compare_ja(rng, key):
    a, b = key
    return Item("compare_ja", "ja", f"{a}と{b}では、どちらが大きいですか。", f"{max(a, b)}です。")


def _unit_ja(rng, key):
    i, n = key
    a, b, _, _, f = C.CONVERSIONS[i]
    return Item("unit_ja", "ja", f"{n}{a}は何{b}ですか。", f"{n}{a}は{n * f:,}{b}です。")


def _pref_capital(rng, key):
    pref, kind, _, capital, _, _ = C.PREFECTURES[key]
    office = {"都": "都庁", "道": "道庁", "府": "府庁", "県": "県庁"}[kind]
    return Item("prefecture_ja", "ja", f"{pref}の{office}所在地はどこですか。", f"{capital}です。")


def _country_ja(rng, key):
    country, capital, _, _ = C.COUNTRIES[key]
    return Item("capital_ja", "ja", f"{country}の首都はどこですか。", f"{capital}です。")


def _reading_ja(rng, key):
    word, reading = key
    q = rng.choice([f"「{word}」の読み方を教えてください。", f"「{word}」は何と読みますか。"])
    return Item("reading_ja", "ja", q, f"「{word}」は「{reading}」と読みます。")


def _kata2hira(rng, key):
    instr = rng.choice(["次のカタカナをひらがなに直してください。", "次の言葉をひらがなで書いてください。"])
    return Item("katakana_ja", "ja", instr, _to_hiragana(key), input=key)


def _reverse_ja(rng, key):
    return Item("reverse_ja", "ja", "次の言葉を逆から書いてください。", key[::-1], input=key)


def _count_ja(rng, key):
    return Item("count_ja", "ja", f"「{key}」は何文字ですか。", f"{len(key)}文字です。")


def _translate_en_ja(rng, key):
    en, ja = C.PAIRS[key]
    return Item("translate_ja", "ja", "次の英語を日本語に訳してください。", ja, input=en)


def _add_en(rng, key):
    a, b = key
    name, obj = rng.choice(C.NAMES_EN), rng.choice(OBJECTS_EN)
    q = rng.choice([
        f"{name} has {a} {obj} and gets {b} more. How many {obj} does {name} have now?",
        f"There are {a} {obj} in one box and {b} in another. How many {obj} are there in total?",
    ])
    return Item("add_en", "en", q, f"{a + b} {obj}.")


def _sub_en(rng, key):
    a, b = key
    name, obj = rng.choice(C.NAMES_EN), rng.choice(OBJECTS_EN)
    return Item("sub_en", "en", f"{name} has {a} {obj} and gives away {b}. How many {obj} are left?", f"{a - b} {obj}.")


def _country_en(rng, key):
    _, _, country, capital = C.COUNTRIES[key]
    return Item("capital_en", "en", f"What is the capital of {country}?", f"{capital}.")


def _past_en(rng, key):
    base, past, _, _ = C.IRREGULAR_VERBS[key]
    return Item("past_en", "en", f"What is the past tense of \"{base}\"?", f"The past tense of {base} is {past}.")


def _unit_en(rng, key):
    i, n = key
    _, _, ea, eb, f = C.CONVERSIONS[i]
    return Item("unit_en", "en", f"How many {eb} are in {n} {ea}?", f"{n} {ea} is {n * f:,} {eb}.")


def _reverse_en(rng, key):
    return Item("reverse_en", "en", "Write the word backwards.", key[::-1], input=key)


def _count_en(rng, key):
    return Item("count_en", "en", f"How many letters are in the word \"{key}\"?", f"{len(key)} letters.")


def _translate_ja_en(rng, key):
    en, ja = C.PAIRS[key]
    return Item("translate_en", "en", "Translate into English.", en, input=ja)


_READINGS = [(w, r) for _, _, entries in C.GLOSSARY for w, r, _ in entries if w != r]
_KATAKANA = sorted(set(KATAKANA_WORDS) | {w for _, _, entries in C.GLOSSARY for w, r, _ in entries
                                           if w == r and all("\u30a1" <= c <= "\u30fc" for c in w)})
_COUNT_WORDS = sorted(set(HIRAGANA_WORDS) | set(KATAKANA_WORDS))

FAMILIES = [
    Family("add_ja", 12, lambda: [(a, b) for a in range(1, 21) for b in range(1, 21)], _add_ja, 8),
    Family("sub_ja", 8, lambda: [(a, b) for a in range(3, 31) for b in range(1, a)], _sub_ja, 6),
    Family("mul_ja", 6, lambda: [(a, b) for a in range(2, 10) for b in range(2, 10)], _mul_ja, 5),
    Family("compare_ja", 5, lambda: [(a, b) for a in range(1, 100) for b in range(1, 100) if a != b], _compare_ja, 5),
    Family("unit_ja", 5, lambda: [(i, n) for i in range(len(C.CONVERSIONS)) for n in range(2, 31)], _unit_ja, 5, "unit"),
    Family("prefecture_ja", 6, lambda: list(range(len(C.PREFECTURES))), _pref_capital, 6),
    Family("capital_ja", 5, lambda: list(range(len(C.COUNTRIES))), _country_ja, 5, "country"),
    Family("reading_ja", 6, lambda: list(_READINGS), _reading_ja, 6),
    Family("katakana_ja", 7, lambda: list(_KATAKANA), _kata2hira, 6),
    Family("reverse_ja", 5, lambda: list(HIRAGANA_WORDS), _reverse_ja, 5),
    Family("count_ja", 4, lambda: list(_COUNT_WORDS), _count_ja, 5),
    Family("translate_ja", 3, lambda: list(range(len(C.PAIRS))), _translate_en_ja, 4, "pair"),
    Family("add_en", 6, lambda: [(a, b) for a in range(2, 21) for b in range(2, 21)], _add_en, 5),
    Family("sub_en", 4, lambda: [(a, b) for a in range(5, 31) for b in range(1, a - 1)], _sub_en, 4),
    Family("capital_en", 4, lambda: list(range(len(C.COUNTRIES))), _country_en, 5, "country"),
    Family("past_en", 4, lambda: list(range(len(C.IRREGULAR_VERBS))), _past_en, 5),
    Family("unit_en", 3, lambda: [(i, n) for i in range(len(C.CONVERSIONS)) for n in range(2, 31)], _unit_en, 4, "unit"),
    Family("reverse_en", 3, lambda: list(ENGLISH_WORDS), _reverse_en, 4),
    Family("count_en", 2, lambda: list(ENGLISH_WORDS), _count_en, 3),
    Family("translate_en", 2, lambda: list(range(len(C.PAIRS))), _translate_ja_en, 4, "pair"),
]

# --------------------------------------------------------------------------------------------------
# Records
# --------------------------------------------------------------------------------------------------


def _system(rng: random.Random, lang: str) -> list[dict]:
    """No system message (half the time), the Japanese Alpaca sentence, or a short system prompt."""
    r = rng.random()
    if r < 0.5:
        return []
    if r < 0.8:
        return [{"role": "system", "content": SYSTEM_JA}]
    return [{"role": "system", "content": rng.choice(SYSTEMS_JA if lang == "ja" else SYSTEMS_EN)}]


def _alpaca_messages(instruction: str, input: str) -> list[dict]:
    # The conversion of tanuki.data.sft.alpaca_to_messages, without the answer.
    if input:
        return [{"role": "system", "content": SYSTEM_JA_INPUT},
                {"role": "user", "content": instruction + INPUT_HEADER + input}]
    return [{"role": "system", "content": SYSTEM_JA}, {"role": "user", "content": instruction}]


def single_turn(rng: random.Random, instruction: str, input: str, answer: str, lang: str) -> dict:
    """An Alpaca record (a third of the time) or a messages record."""
    if rng.random() < 1 / 3:
        record = {"instruction": instruction}
        if input:
            record["input"] = input
        record["output"] = answer
        return record
    user = f"{instruction}\n{input}" if input else instruction
    return {"messages": _system(rng, lang) + [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]}


def multi_turn(rng: random.Random, first: tuple[str, str, str], lang: str, follow: tuple[str, str]) -> dict:
    """A question, its answer, then a follow-up question and its answer."""
    return {"messages": _system(rng, lang) + [
        {"role": "user", "content": first[0]}, {"role": "assistant", "content": first[1]},
        {"role": "user", "content": follow[0]}, {"role": "assistant", "content": follow[1]},
    ]}


def generate(n_train: int = SAMPLE_TRAIN, n_eval: int = SAMPLE_EVAL, seed: int = SAMPLE_SEED) -> tuple[list[dict], list[dict]]:
    """(training records, eval records). Eval keys are drawn first and never trained on."""
    rng = random.Random(seed)
    held: dict[str, set] = {}  # by group (a family without a group is its own)
    eval_keys: dict[str, list] = {}
    eval_total = sum(f.n_eval for f in FAMILIES)
    for fam in FAMILIES:
        keys = fam.keys()
        k = max(1, round(fam.n_eval * n_eval / eval_total))
        eval_keys[fam.name] = [keys[i] for i in rng.sample(range(len(keys)), k)]
        held.setdefault(fam.group or fam.name, set()).update(eval_keys[fam.name])
    train_keys = {f.name: [key for key in f.keys() if key not in held[f.group or f.name]] for f in FAMILIES}
    eval_records: list[dict] = []
    for fam in FAMILIES:
        for key in eval_keys[fam.name]:
            item = fam.make(rng, key)
            if rng.random() < 1 / 3:
                messages = _alpaca_messages(item.instruction, item.input)
            else:
                messages = _system(rng, item.lang) + [{"role": "user", "content": item.user_text()}]
            eval_records.append({"messages": messages, "answer": item.answer, "task": item.task})
    rng.shuffle(eval_records)

    def task_item(lang: Sequence[str] = ("ja", "en")) -> Item:
        while True:
            fam = rng.choices(FAMILIES, [f.weight for f in FAMILIES])[0]
            item = fam.make(rng, rng.choice(train_keys[fam.name]))
            if item.lang in lang:
                return item

    records: list[dict] = []
    while len(records) < n_train:
        r = rng.random()
        if r < 0.68:  # a checkable task, single turn
            item = task_item()
            records.append(single_turn(rng, item.instruction, item.input, item.answer, item.lang))
        elif r < 0.80:  # a hand-written question or writing task
            if rng.random() < 0.75:
                lang = "ja" if rng.random() < 0.55 else "en"
                q, a = rng.choice(GENERAL_JA if lang == "ja" else GENERAL_EN)
                records.append(single_turn(rng, q, "", a, lang))
            else:
                lang = "ja" if rng.random() < 0.6 else "en"
                instr, inp, out = rng.choice(REWRITES_JA if lang == "ja" else REWRITES_EN)
                records.append(single_turn(rng, instr, inp, out, lang))
        else:  # multi-turn: a question, then thanks or another question in the same language
            lang = "ja" if rng.random() < 0.6 else "en"
            if rng.random() < 0.5:
                item = task_item((lang,))
                first = (item.user_text(), item.answer, lang)
            else:
                first = (*rng.choice(GENERAL_JA if lang == "ja" else GENERAL_EN), lang)
            if rng.random() < 0.4:
                follow = rng.choice(THANKS_JA if lang == "ja" else THANKS_EN)
            else:
                item = task_item((lang,))
                follow = (item.user_text(), item.answer)
            records.append(multi_turn(rng, first, lang, follow))
    return records, eval_records


def write_jsonl(path: str | Path, records: list[dict]) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out-dir", default=str(DATA), help="directory for sft.jsonl and sft_eval.jsonl")
    parser.add_argument("--train", type=int, default=SAMPLE_TRAIN, help="training conversations")
    parser.add_argument("--eval", type=int, default=SAMPLE_EVAL, help="held-out eval prompts (about)")
    parser.add_argument("--seed", type=int, default=SAMPLE_SEED)
    args = parser.parse_args()
    train, evals = generate(args.train, args.eval, args.seed)
    out = Path(args.out_dir)
    write_jsonl(out / "sft.jsonl", train)
    write_jsonl(out / "sft_eval.jsonl", evals)
    print(f"wrote {len(train)} conversations to {out / 'sft.jsonl'} and {len(evals)} eval prompts to {out / 'sft_eval.jsonl'}")


if __name__ == "__main__":
    main()
