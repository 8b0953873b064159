"""Generate tanuki's bilingual sample corpus (Japanese, English, code, numbers) deterministically.

The corpus is the hand-written text in ``tanuki/sample_data/seed/`` (one document per paragraph of
``ja.txt`` and ``en.txt``, one per ``%%``-separated snippet of ``code.txt``) plus documents made
from templates whose content is consistent and therefore learnable: weather reports whose
temperatures follow the month and the city, diaries whose weekday matches the date, receipts that
add up, word problems with correct answers, timetables whose times agree, conversions, recipes
scaled to the number of servings, and small programs whose printed results are right.

Each line of the output is ``{"text": ..., "lang": "ja" | "en" | "code"}``.

    python scripts/sample_data/make_corpus.py                             # rewrite corpus.jsonl (~450 KB)
    python scripts/sample_data/make_corpus.py --out /tmp/bench.jsonl --size-mb 25 --seed 1
        # a larger corpus for benchmarks: beyond the sample size it adds hand-written sentences in
        # random order and sentence frames filled from a made-up lexicon, for a real-sized vocabulary

The same arguments always give the same bytes.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
import random
from pathlib import Path
from typing import Callable, Iterator

HERE = Path(__file__).resolve().parent
#: the package's sample data (``tanuki/sample_data/``): the hand-written ``seed/`` text, and where
#: ``corpus.jsonl`` is written by default
DATA = HERE.parents[1] / "tanuki" / "sample_data"
#: size of the committed corpus.jsonl
SAMPLE_BYTES = 450_000
SAMPLE_SEED = 0

# --------------------------------------------------------------------------------------------------
# Word banks
# --------------------------------------------------------------------------------------------------

# prefecture, kind (都道府県), region, capital; English name and capital
PREFECTURES = [
    ("北海道", "道", "北海道地方", "札幌市", "Hokkaido", "Sapporo"),
    ("青森県", "県", "東北地方", "青森市", "Aomori", "Aomori"),
    ("岩手県", "県", "東北地方", "盛岡市", "Iwate", "Morioka"),
    ("宮城県", "県", "東北地方", "仙台市", "Miyagi", "Sendai"),
    ("秋田県", "県", "東北地方", "秋田市", "Akita", "Akita"),
    ("山形県", "県", "東北地方", "山形市", "Yamagata", "Yamagata"),
    ("福島県", "県", "東北地方", "福島市", "Fukushima", "Fukushima"),
    ("茨城県", "県", "関東地方", "水戸市", "Ibaraki", "Mito"),
    ("栃木県", "県", "関東地方", "宇都宮市", "Tochigi", "Utsunomiya"),
    ("群馬県", "県", "関東地方", "前橋市", "Gunma", "Maebashi"),
    ("埼玉県", "県", "関東地方", "さいたま市", "Saitama", "Saitama"),
    ("千葉県", "県", "関東地方", "千葉市", "Chiba", "Chiba"),
    ("神奈川県", "県", "関東地方", "横浜市", "Kanagawa", "Yokohama"),
    ("新潟県", "県", "中部地方", "新潟市", "Niigata", "Niigata"),
    ("富山県", "県", "中部地方", "富山市", "Toyama", "Toyama"),
    ("石川県", "県", "中部地方", "金沢市", "Ishikawa", "Kanazawa"),
    ("福井県", "県", "中部地方", "福井市", "Fukui", "Fukui"),
    ("山梨県", "県", "中部地方", "甲府市", "Yamanashi", "Kofu"),
    ("長野県", "県", "中部地方", "長野市", "Nagano", "Nagano"),
    ("岐阜県", "県", "中部地方", "岐阜市", "Gifu", "Gifu"),
    ("静岡県", "県", "中部地方", "静岡市", "Shizuoka", "Shizuoka"),
    ("愛知県", "県", "中部地方", "名古屋市", "Aichi", "Nagoya"),
    ("三重県", "県", "近畿地方", "津市", "Mie", "Tsu"),
    ("滋賀県", "県", "近畿地方", "大津市", "Shiga", "Otsu"),
    ("京都府", "府", "近畿地方", "京都市", "Kyoto", "Kyoto"),
    ("大阪府", "府", "近畿地方", "大阪市", "Osaka", "Osaka"),
    ("兵庫県", "県", "近畿地方", "神戸市", "Hyogo", "Kobe"),
    ("奈良県", "県", "近畿地方", "奈良市", "Nara", "Nara"),
    ("和歌山県", "県", "近畿地方", "和歌山市", "Wakayama", "Wakayama"),
    ("鳥取県", "県", "中国地方", "鳥取市", "Tottori", "Tottori"),
    ("島根県", "県", "中国地方", "松江市", "Shimane", "Matsue"),
    ("岡山県", "県", "中国地方", "岡山市", "Okayama", "Okayama"),
    ("広島県", "県", "中国地方", "広島市", "Hiroshima", "Hiroshima"),
    ("山口県", "県", "中国地方", "山口市", "Yamaguchi", "Yamaguchi"),
    ("徳島県", "県", "四国地方", "徳島市", "Tokushima", "Tokushima"),
    ("香川県", "県", "四国地方", "高松市", "Kagawa", "Takamatsu"),
    ("愛媛県", "県", "四国地方", "松山市", "Ehime", "Matsuyama"),
    ("高知県", "県", "四国地方", "高知市", "Kochi", "Kochi"),
    ("福岡県", "県", "九州地方", "福岡市", "Fukuoka", "Fukuoka"),
    ("佐賀県", "県", "九州地方", "佐賀市", "Saga", "Saga"),
    ("長崎県", "県", "九州地方", "長崎市", "Nagasaki", "Nagasaki"),
    ("熊本県", "県", "九州地方", "熊本市", "Kumamoto", "Kumamoto"),
    ("大分県", "県", "九州地方", "大分市", "Oita", "Oita"),
    ("宮崎県", "県", "九州地方", "宮崎市", "Miyazaki", "Miyazaki"),
    ("鹿児島県", "県", "九州地方", "鹿児島市", "Kagoshima", "Kagoshima"),
    ("沖縄県", "県", "九州地方", "那覇市", "Okinawa", "Naha"),
]
REGIONS_EN = {
    "北海道地方": "the Hokkaido region", "東北地方": "the Tohoku region", "関東地方": "the Kanto region",
    "中部地方": "the Chubu region", "近畿地方": "the Kinki region", "中国地方": "the Chugoku region",
    "四国地方": "the Shikoku region", "九州地方": "the Kyushu region",
}

# city (ja, en) and its temperature offset from the monthly baseline, in degrees
CITIES = [
    ("札幌", "Sapporo", -7), ("仙台", "Sendai", -3), ("新潟", "Niigata", -2), ("東京", "Tokyo", 0),
    ("名古屋", "Nagoya", 0), ("大阪", "Osaka", 1), ("広島", "Hiroshima", 0), ("高知", "Kochi", 1),
    ("福岡", "Fukuoka", 1), ("那覇", "Naha", 6),
]
# monthly mean high / low in a Tokyo-like climate, January first
MONTH_HIGH = [10, 11, 14, 19, 23, 26, 30, 31, 27, 22, 17, 12]
MONTH_LOW = [2, 3, 6, 11, 16, 19, 23, 24, 21, 15, 9, 4]
MONTHS_EN = ["January", "February", "March", "April", "May", "June", "July", "August", "September",
             "October", "November", "December"]
WEEKDAYS_JA = ["月", "火", "水", "木", "金", "土", "日"]
WEEKDAYS_EN = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]

# weather (ja, en), chance of rain range in tens of percent, wet or not
WEATHER = [
    ("晴れ", "sunny", (0, 1), False),
    ("晴れ時々くもり", "sunny with some clouds", (1, 2), False),
    ("くもり", "cloudy", (2, 3), False),
    ("くもり時々雨", "cloudy with occasional rain", (4, 6), True),
    ("雨", "rainy", (7, 9), True),
    ("雨のちくもり", "rain clearing to clouds", (5, 7), True),
]
SNOW = ("雪", "snowy", (6, 8), True)

NAMES_JA = ["たろう", "はなこ", "けんた", "さくら", "ゆうと", "あおい", "そうた", "ひまり", "はると", "めい"]
NAMES_EN = ["Tom", "Emma", "Liam", "Olivia", "Noah", "Ava", "Lucas", "Mia", "Ethan", "Sophie"]

# diary: (activity, details, activity in English, details in English)
DIARY = [
    ("友だちと公園へ行きました", ["ブランコに乗ったり、鬼ごっこをしたりしました", "ベンチに座ってお弁当を食べました", "池のまわりを散歩して、カモを見ました"],
     "I went to the park with a friend", ["We played tag and rode the swings", "We ate our lunch on a bench", "We walked around the pond and watched the ducks"]),
    ("図書館で本を借りました", ["動物の図鑑と推理小説を一冊ずつ選びました", "読みたかった歴史の本がやっと返ってきていました", "司書さんにおすすめの絵本を教えてもらいました"],
     "I borrowed books from the library", ["I picked an animal encyclopedia and a mystery novel", "The history book I wanted was finally back on the shelf", "The librarian recommended a picture book"]),
    ("家族でカレーを作りました", ["じゃがいもとにんじんの皮をむくのが私の係でした", "少し辛かったけれど、みんなでおかわりしました", "隠し味にりんごを入れてみました"],
     "my family made curry together", ["My job was peeling the potatoes and carrots", "It was a little spicy, but everyone had seconds", "We added grated apple as a secret ingredient"]),
    ("電車に乗っておばあちゃんの家へ行きました", ["窓から見える田んぼがきれいでした", "駅までおじいちゃんが迎えに来てくれました", "帰りに駅でおみやげを買いました"],
     "I took the train to my grandmother's house", ["The rice fields outside the window were beautiful", "My grandfather met me at the station", "I bought a souvenir at the station on the way home"]),
    ("朝から部屋の掃除をしました", ["机の引き出しから昔の写真が出てきました", "いらなくなった服を袋にまとめました", "窓をふいたら部屋が明るくなりました"],
     "I cleaned my room in the morning", ["I found old photos in my desk drawer", "I packed the clothes I no longer wear into a bag", "After I washed the window the room felt brighter"]),
    ("プログラミングの練習をしました", ["画面に九九の表を表示するプログラムを書きました", "エラーの原因が分かるまで一時間かかりました", "関数の使い方が少し分かってきました"],
     "I practiced programming", ["I wrote a program that prints the multiplication table", "It took an hour to find the cause of an error", "I am starting to understand how functions work"]),
    ("川沿いを自転車で走りました", ["風が気持ちよくて、いつもより遠くまで行きました", "橋の上から魚が泳いでいるのが見えました", "途中のパン屋で休憩しました"],
     "I rode my bicycle along the river", ["The wind felt nice, so I went farther than usual", "From the bridge I could see fish swimming", "I took a break at a bakery on the way"]),
    ("ピアノの発表会がありました", ["始まる前はとても緊張しました", "最後まで間違えずにひけました", "先生にほめてもらいました"],
     "I had a piano recital", ["I was very nervous before it started", "I played to the end without a mistake", "My teacher praised me"]),
]
FEELINGS_JA = ["とても楽しい一日でした", "少し疲れましたが、充実した一日でした", "また行きたいと思います", "明日もがんばろうと思います", "早く寝ようと思います"]
FEELINGS_EN = ["It was a really fun day.", "I am a little tired, but it was a good day.", "I would like to do it again.", "I will do my best tomorrow too.", "I think I will go to bed early."]

# shop items: (ja name, yen, en name, price in cents)
ITEMS = [
    ("りんご", 120, "apples", 120), ("牛乳", 198, "milk", 249), ("食パン", 160, "bread", 299),
    ("たまご", 230, "eggs", 349), ("にんじん", 80, "carrots", 89), ("お茶", 150, "green tea", 199),
    ("ノート", 180, "notebooks", 250), ("えんぴつ", 60, "pencils", 75), ("バナナ", 100, "bananas", 59),
    ("豆腐", 90, "tofu", 199), ("みかん", 50, "oranges", 65), ("チーズ", 320, "cheese", 450),
]

# recipes: name, servings of the base quantities, ingredients (name, quantity, unit), steps
RECIPES_JA = [
    ("みそ汁", 2, [("だし", 400, "ml"), ("豆腐", 150, "g"), ("わかめ", 5, "g"), ("みそ", 30, "g")],
     ["鍋にだしを入れて火にかけます。", "さいの目に切った豆腐とわかめを入れて温めます。", "火を止めてからみそを溶き入れます。"]),
    ("親子丼", 2, [("鶏もも肉", 200, "g"), ("玉ねぎ", 100, "g"), ("卵", 3, "個"), ("だし", 150, "ml"), ("しょうゆ", 30, "ml"), ("ご飯", 400, "g")],
     ["鶏肉を一口大に、玉ねぎを薄切りにします。", "だしとしょうゆで鶏肉と玉ねぎを煮ます。", "溶き卵を回し入れ、半熟になったらご飯にのせます。"]),
    ("野菜いため", 2, [("キャベツ", 200, "g"), ("にんじん", 50, "g"), ("豚肉", 150, "g"), ("油", 15, "ml"), ("塩", 2, "g")],
     ["野菜を食べやすい大きさに切ります。", "フライパンに油を熱し、豚肉をいためます。", "野菜を加えて強火でいため、塩で味を調えます。"]),
    ("ホットケーキ", 2, [("小麦粉", 150, "g"), ("卵", 1, "個"), ("牛乳", 120, "ml"), ("砂糖", 30, "g"), ("ベーキングパウダー", 5, "g")],
     ["卵と牛乳と砂糖をよく混ぜます。", "小麦粉とベーキングパウダーを加えてさっくり混ぜます。", "弱火で両面をこんがり焼きます。"]),
]
RECIPES_EN = [
    ("miso soup", 2, [("dashi", 400, "ml"), ("tofu", 150, "g"), ("wakame seaweed", 5, "g"), ("miso", 30, "g")],
     ["Heat the dashi in a pot.", "Add the diced tofu and the wakame and warm them through.", "Turn off the heat and stir in the miso."]),
    ("pancakes", 2, [("flour", 150, "g"), ("egg", 1, ""), ("milk", 120, "ml"), ("sugar", 30, "g"), ("baking powder", 5, "g")],
     ["Whisk the egg, milk and sugar together.", "Fold in the flour and baking powder.", "Cook on low heat until golden on both sides."]),
    ("vegetable stir-fry", 2, [("cabbage", 200, "g"), ("carrot", 50, "g"), ("pork", 150, "g"), ("oil", 15, "ml"), ("salt", 2, "g")],
     ["Cut the vegetables into bite-sized pieces.", "Heat the oil in a pan and fry the pork.", "Add the vegetables, stir-fry on high heat and season with salt."]),
]

# a fictional express line: station (ja, en) and minutes from the first station
LINE = [("東京", "Tokyo", 0), ("品川", "Shinagawa", 7), ("新横浜", "Shin-Yokohama", 19), ("小田原", "Odawara", 42),
        ("静岡", "Shizuoka", 85), ("浜松", "Hamamatsu", 112), ("名古屋", "Nagoya", 150), ("京都", "Kyoto", 189),
        ("新大阪", "Shin-Osaka", 204)]
TRAIN_NAMES = ["ひかり", "こだま", "あおば", "はやて", "つばさ", "みどり"]

# English / Japanese sentence pairs written for this corpus
PAIRS = [
    ("The cat is sleeping on the sofa.", "猫がソファの上で寝ています。"),
    ("It is cold this morning.", "今朝は寒いです。"),
    ("Where is the station?", "駅はどこですか。"),
    ("I drink coffee every morning.", "私は毎朝コーヒーを飲みます。"),
    ("This book is very interesting.", "この本はとても面白いです。"),
    ("Please speak more slowly.", "もう少しゆっくり話してください。"),
    ("My brother lives in Osaka.", "兄は大阪に住んでいます。"),
    ("The train arrives at ten o'clock.", "電車は十時に到着します。"),
    ("I forgot my umbrella at school.", "学校に傘を忘れました。"),
    ("How much is this apple?", "このりんごはいくらですか。"),
    ("We went to the sea last summer.", "去年の夏、私たちは海へ行きました。"),
    ("The library opens at nine.", "図書館は九時に開きます。"),
    ("She is good at drawing.", "彼女は絵を描くのが上手です。"),
    ("Let's eat lunch together.", "いっしょに昼ごはんを食べましょう。"),
    ("The river is clean and cold.", "川はきれいで冷たいです。"),
    ("I am learning Japanese.", "私は日本語を勉強しています。"),
    ("The program prints the result.", "プログラムは結果を表示します。"),
    ("Save the file before you close it.", "閉じる前にファイルを保存してください。"),
    ("The tanuki came out at night.", "たぬきは夜になると出てきました。"),
    ("It will rain tomorrow afternoon.", "明日の午後は雨が降るでしょう。"),
    ("My favorite season is autumn.", "私の好きな季節は秋です。"),
    ("Turn left at the second corner.", "二つ目の角を左に曲がってください。"),
    ("The shop is closed on Mondays.", "その店は月曜日が休みです。"),
    ("I have two sisters and one brother.", "私には姉妹が二人と兄弟が一人います。"),
    ("The mountain is covered with snow.", "山は雪でおおわれています。"),
    ("Could you help me carry this box?", "この箱を運ぶのを手伝ってもらえますか。"),
    ("The computer is slow today.", "今日はコンピューターの動きが遅いです。"),
    ("Wash your hands before eating.", "食べる前に手を洗いましょう。"),
    ("The festival starts at six in the evening.", "祭りは夕方六時に始まります。"),
    ("I read the news on my phone.", "私は電話でニュースを読みます。"),
]

# unit conversions: (ja from, ja to, en from, en to, factor)
CONVERSIONS = [
    ("キロメートル", "メートル", "kilometers", "meters", 1000),
    ("メートル", "センチメートル", "meters", "centimeters", 100),
    ("時間", "分", "hours", "minutes", 60),
    ("分", "秒", "minutes", "seconds", 60),
    ("リットル", "ミリリットル", "liters", "milliliters", 1000),
    ("キログラム", "グラム", "kilograms", "grams", 1000),
    ("日", "時間", "days", "hours", 24),
    ("週間", "日", "weeks", "days", 7),
]

SHAPES = [  # name, params, formula (Python), docstring ja, docstring en
    ("rectangle", ("width", "height"), "width * height", "長方形の面積を返す。", "Area of a rectangle."),
    ("triangle", ("base", "height"), "base * height / 2", "三角形の面積を返す。", "Area of a triangle."),
    ("square", ("side",), "side * side", "正方形の面積を返す。", "Area of a square."),
    ("trapezoid", ("top", "bottom", "height"), "(top + bottom) * height / 2", "台形の面積を返す。", "Area of a trapezoid."),
]
ANIMALS = [("Tanuki", "ぽんぽこ", "pon-poko"), ("Cat", "にゃー", "meow"), ("Dog", "わん", "woof"),
           ("Frog", "けろけろ", "ribbit"), ("Crow", "かあかあ", "caw"), ("Cow", "もー", "moo")]
TABLES = [("books", ["title", "author", "published_year", "pages"]),
          ("stations", ["name", "line", "opened", "passengers"]),
          ("weather", ["city", "date", "high", "low", "rain_mm"]),
          ("orders", ["customer_id", "item", "quantity", "price"])]


# countries and capitals: (ja country, ja capital, en country, en capital)
COUNTRIES = [
    ("日本", "東京", "Japan", "Tokyo"), ("中国", "北京", "China", "Beijing"), ("韓国", "ソウル", "South Korea", "Seoul"),
    ("アメリカ", "ワシントンD.C.", "the United States", "Washington, D.C."), ("イギリス", "ロンドン", "the United Kingdom", "London"),
    ("フランス", "パリ", "France", "Paris"), ("ドイツ", "ベルリン", "Germany", "Berlin"), ("イタリア", "ローマ", "Italy", "Rome"),
    ("スペイン", "マドリード", "Spain", "Madrid"), ("カナダ", "オタワ", "Canada", "Ottawa"),
    ("ブラジル", "ブラジリア", "Brazil", "Brasilia"), ("インド", "ニューデリー", "India", "New Delhi"),
    ("オーストラリア", "キャンベラ", "Australia", "Canberra"), ("エジプト", "カイロ", "Egypt", "Cairo"),
    ("メキシコ", "メキシコシティ", "Mexico", "Mexico City"), ("ロシア", "モスクワ", "Russia", "Moscow"),
    ("タイ", "バンコク", "Thailand", "Bangkok"), ("ベトナム", "ハノイ", "Vietnam", "Hanoi"), ("ケニア", "ナイロビ", "Kenya", "Nairobi"),
    ("アルゼンチン", "ブエノスアイレス", "Argentina", "Buenos Aires"), ("トルコ", "アンカラ", "Turkey", "Ankara"),
    ("ギリシャ", "アテネ", "Greece", "Athens"), ("ノルウェー", "オスロ", "Norway", "Oslo"),
    ("スウェーデン", "ストックホルム", "Sweden", "Stockholm"), ("フィンランド", "ヘルシンキ", "Finland", "Helsinki"),
    ("ポルトガル", "リスボン", "Portugal", "Lisbon"), ("オランダ", "アムステルダム", "the Netherlands", "Amsterdam"),
    ("ペルー", "リマ", "Peru", "Lima"), ("チリ", "サンティアゴ", "Chile", "Santiago"), ("インドネシア", "ジャカルタ", "Indonesia", "Jakarta"),
    ("フィリピン", "マニラ", "the Philippines", "Manila"), ("ニュージーランド", "ウェリントン", "New Zealand", "Wellington"),
]

# English irregular verbs: base, past, past participle, meaning in Japanese
IRREGULAR_VERBS = [
    ("be", "was", "been", "である"), ("begin", "began", "begun", "始める"), ("break", "broke", "broken", "壊す"),
    ("bring", "brought", "brought", "持ってくる"), ("build", "built", "built", "建てる"), ("buy", "bought", "bought", "買う"),
    ("catch", "caught", "caught", "捕まえる"), ("choose", "chose", "chosen", "選ぶ"), ("come", "came", "come", "来る"),
    ("do", "did", "done", "する"), ("draw", "drew", "drawn", "描く"), ("drink", "drank", "drunk", "飲む"),
    ("drive", "drove", "driven", "運転する"), ("eat", "ate", "eaten", "食べる"), ("fall", "fell", "fallen", "落ちる"),
    ("feel", "felt", "felt", "感じる"), ("find", "found", "found", "見つける"), ("fly", "flew", "flown", "飛ぶ"),
    ("forget", "forgot", "forgotten", "忘れる"), ("get", "got", "gotten", "得る"), ("give", "gave", "given", "与える"),
    ("go", "went", "gone", "行く"), ("grow", "grew", "grown", "育つ"), ("have", "had", "had", "持っている"),
    ("hear", "heard", "heard", "聞こえる"), ("hide", "hid", "hidden", "隠す"), ("keep", "kept", "kept", "保つ"),
    ("know", "knew", "known", "知っている"), ("leave", "left", "left", "去る"), ("lose", "lost", "lost", "失う"),
    ("make", "made", "made", "作る"), ("meet", "met", "met", "会う"), ("pay", "paid", "paid", "払う"),
    ("read", "read", "read", "読む"), ("ride", "rode", "ridden", "乗る"), ("ring", "rang", "rung", "鳴る"),
    ("run", "ran", "run", "走る"), ("say", "said", "said", "言う"), ("see", "saw", "seen", "見る"), ("sell", "sold", "sold", "売る"),
    ("send", "sent", "sent", "送る"), ("sing", "sang", "sung", "歌う"), ("sit", "sat", "sat", "座る"), ("sleep", "slept", "slept", "眠る"),
    ("speak", "spoke", "spoken", "話す"), ("spend", "spent", "spent", "過ごす"), ("stand", "stood", "stood", "立つ"),
    ("swim", "swam", "swum", "泳ぐ"), ("take", "took", "taken", "取る"), ("teach", "taught", "taught", "教える"),
    ("tell", "told", "told", "伝える"), ("think", "thought", "thought", "考える"), ("throw", "threw", "thrown", "投げる"),
    ("understand", "understood", "understood", "理解する"), ("wake", "woke", "woken", "目覚める"), ("wear", "wore", "worn", "着る"),
    ("win", "won", "won", "勝つ"), ("write", "wrote", "written", "書く"),
]

# A bilingual glossary: "category in Japanese|in English" then word:reading:English entries.
GLOSSARY_TEXT = """
果物|fruits
林檎:りんご:apple, 蜜柑:みかん:mandarin orange, 葡萄:ぶどう:grape, 桃:もも:peach, 梨:なし:pear, 苺:いちご:strawberry,
柿:かき:persimmon, 西瓜:すいか:watermelon, 栗:くり:chestnut, 梅:うめ:Japanese apricot, 柚子:ゆず:yuzu citron
野菜|vegetables
大根:だいこん:daikon radish, 人参:にんじん:carrot, 玉葱:たまねぎ:onion, 胡瓜:きゅうり:cucumber, 茄子:なす:eggplant,
南瓜:かぼちゃ:pumpkin, 白菜:はくさい:napa cabbage, 牛蒡:ごぼう:burdock root, 生姜:しょうが:ginger, 大蒜:にんにく:garlic,
蓮根:れんこん:lotus root, 筍:たけのこ:bamboo shoot, 椎茸:しいたけ:shiitake mushroom, 薩摩芋:さつまいも:sweet potato,
馬鈴薯:じゃがいも:potato, 葱:ねぎ:green onion
動物|animals
犬:いぬ:dog, 猫:ねこ:cat, 馬:うま:horse, 牛:うし:cow, 豚:ぶた:pig, 羊:ひつじ:sheep, 山羊:やぎ:goat, 兎:うさぎ:rabbit,
狐:きつね:fox, 狸:たぬき:raccoon dog, 熊:くま:bear, 猿:さる:monkey, 鹿:しか:deer, 猪:いのしし:wild boar, 鼠:ねずみ:mouse,
象:ぞう:elephant, 虎:とら:tiger, 亀:かめ:turtle, 蛙:かえる:frog, 蛇:へび:snake, 栗鼠:りす:squirrel
鳥|birds
鶏:にわとり:chicken, 烏:からす:crow, 雀:すずめ:sparrow, 鳩:はと:pigeon, 燕:つばめ:swallow, 鶴:つる:crane, 鷺:さぎ:heron,
鴨:かも:duck, 鷹:たか:hawk, 梟:ふくろう:owl, 鴎:かもめ:seagull, 白鳥:はくちょう:swan
魚や海の生き物|fish and sea creatures
鮭:さけ:salmon, 鮪:まぐろ:tuna, 鯛:たい:sea bream, 鯖:さば:mackerel, 鰯:いわし:sardine, 鯵:あじ:horse mackerel,
鰻:うなぎ:eel, 鯉:こい:carp, 秋刀魚:さんま:Pacific saury, 蛸:たこ:octopus, 烏賊:いか:squid, 海老:えび:shrimp, 蟹:かに:crab,
鰹:かつお:bonito, 鯨:くじら:whale
虫|insects
蝶:ちょう:butterfly, 蜂:はち:bee, 蟻:あり:ant, 蚊:か:mosquito, 蝉:せみ:cicada, 蜻蛉:とんぼ:dragonfly, 蛍:ほたる:firefly,
蜘蛛:くも:spider, 甲虫:かぶとむし:rhinoceros beetle, 蟋蟀:こおろぎ:cricket
乗り物|vehicles
自転車:じてんしゃ:bicycle, 自動車:じどうしゃ:car, 電車:でんしゃ:train, 地下鉄:ちかてつ:subway, 飛行機:ひこうき:airplane,
船:ふね:ship, 新幹線:しんかんせん:bullet train, 救急車:きゅうきゅうしゃ:ambulance, 消防車:しょうぼうしゃ:fire engine,
路面電車:ろめんでんしゃ:streetcar
仕事|jobs
医者:いしゃ:doctor, 看護師:かんごし:nurse, 先生:せんせい:teacher, 警察官:けいさつかん:police officer,
消防士:しょうぼうし:firefighter, 大工:だいく:carpenter, 料理人:りょうりにん:cook, 農家:のうか:farmer, 漁師:りょうし:fisher,
運転手:うんてんしゅ:driver, 弁護士:べんごし:lawyer, 記者:きしゃ:reporter, 研究者:けんきゅうしゃ:researcher,
技術者:ぎじゅつしゃ:engineer, 司書:ししょ:librarian, 郵便配達員:ゆうびんはいたついん:mail carrier
家具と部屋|furniture and rooms
机:つくえ:desk, 椅子:いす:chair, 本棚:ほんだな:bookshelf, 箪笥:たんす:chest of drawers, 鏡:かがみ:mirror,
炬燵:こたつ:kotatsu table, 座布団:ざぶとん:floor cushion, 押入れ:おしいれ:closet, 畳:たたみ:tatami mat, 台所:だいどころ:kitchen,
玄関:げんかん:entrance hall, 風呂:ふろ:bath
体|parts of the body
頭:あたま:head, 顔:かお:face, 目:め:eye, 耳:みみ:ear, 鼻:はな:nose, 口:くち:mouth, 歯:は:tooth, 首:くび:neck, 肩:かた:shoulder,
腕:うで:arm, 手:て:hand, 指:ゆび:finger, 足:あし:foot, 膝:ひざ:knee, 背中:せなか:back, 心臓:しんぞう:heart
色|colors
赤:あか:red, 青:あお:blue, 黄色:きいろ:yellow, 緑:みどり:green, 白:しろ:white, 黒:くろ:black, 紫:むらさき:purple,
茶色:ちゃいろ:brown, 灰色:はいいろ:gray, 桃色:ももいろ:pink, 橙色:だいだいいろ:orange, 水色:みずいろ:light blue
天気|weather
雨:あめ:rain, 雪:ゆき:snow, 風:かぜ:wind, 雲:くも:cloud, 雷:かみなり:thunder, 霧:きり:fog, 虹:にじ:rainbow,
台風:たいふう:typhoon, 嵐:あらし:storm, 霜:しも:frost
道具|tools
鋏:はさみ:scissors, 金槌:かなづち:hammer, 鋸:のこぎり:saw, 釘:くぎ:nail, 物差し:ものさし:ruler, 傘:かさ:umbrella, 鍵:かぎ:key,
箒:ほうき:broom, 包丁:ほうちょう:kitchen knife, 鍋:なべ:pot, 箸:はし:chopsticks, 茶碗:ちゃわん:rice bowl, 針:はり:needle,
糸:いと:thread
食べ物と飲み物|food and drink
御飯:ごはん:cooked rice, 味噌:みそ:miso, 醤油:しょうゆ:soy sauce, 豆腐:とうふ:tofu, 納豆:なっとう:natto, 蕎麦:そば:soba noodles,
饂飩:うどん:udon noodles, 寿司:すし:sushi, 天麩羅:てんぷら:tempura, 餅:もち:rice cake, 梅干し:うめぼし:pickled plum,
卵焼き:たまごやき:rolled omelet, 御握り:おにぎり:rice ball, 煎餅:せんべい:rice cracker, 団子:だんご:dumpling,
水:みず:water, 牛乳:ぎゅうにゅう:milk, 麦茶:むぎちゃ:barley tea, 緑茶:りょくちゃ:green tea
建物|buildings
学校:がっこう:school, 病院:びょういん:hospital, 図書館:としょかん:library, 郵便局:ゆうびんきょく:post office, 駅:えき:station,
銀行:ぎんこう:bank, 神社:じんじゃ:shrine, 寺:てら:temple, 城:しろ:castle, 市役所:しやくしょ:city hall,
美術館:びじゅつかん:art museum, 博物館:はくぶつかん:museum, 空港:くうこう:airport, 港:みなと:harbor
自然|nature
山:やま:mountain, 川:かわ:river, 海:うみ:sea, 湖:みずうみ:lake, 森:もり:forest, 島:しま:island, 谷:たに:valley, 滝:たき:waterfall,
砂浜:すなはま:beach, 火山:かざん:volcano, 空:そら:sky, 星:ほし:star, 月:つき:moon, 太陽:たいよう:sun
学校の物|things at school
鉛筆:えんぴつ:pencil, 教科書:きょうかしょ:textbook, 筆箱:ふでばこ:pencil case, 黒板:こくばん:blackboard, 地図:ちず:map,
辞書:じしょ:dictionary, 宿題:しゅくだい:homework, 時間割:じかんわり:class schedule, 運動場:うんどうじょう:playground
服|clothes
帽子:ぼうし:hat, 靴:くつ:shoes, 靴下:くつした:socks, 着物:きもの:kimono, 浴衣:ゆかた:summer kimono, 手袋:てぶくろ:gloves,
上着:うわぎ:jacket, 眼鏡:めがね:glasses, 鞄:かばん:bag
花と木|flowers and trees
桜:さくら:cherry blossom, 菊:きく:chrysanthemum, 薔薇:ばら:rose, 向日葵:ひまわり:sunflower, 朝顔:あさがお:morning glory,
紫陽花:あじさい:hydrangea, 蒲公英:たんぽぽ:dandelion, 椿:つばき:camellia, 百合:ゆり:lily, 菫:すみれ:violet, 松:まつ:pine,
杉:すぎ:Japanese cedar, 竹:たけ:bamboo, 楓:かえで:maple, 銀杏:いちょう:ginkgo
動詞|verbs
食べる:たべる:to eat, 飲む:のむ:to drink, 歩く:あるく:to walk, 走る:はしる:to run, 泳ぐ:およぐ:to swim, 読む:よむ:to read,
書く:かく:to write, 話す:はなす:to speak, 聞く:きく:to listen, 見る:みる:to see, 買う:かう:to buy, 売る:うる:to sell,
作る:つくる:to make, 使う:つかう:to use, 待つ:まつ:to wait, 開ける:あける:to open, 閉める:しめる:to close, 教える:おしえる:to teach,
習う:ならう:to learn, 遊ぶ:あそぶ:to play, 働く:はたらく:to work, 休む:やすむ:to rest, 眠る:ねむる:to sleep, 起きる:おきる:to wake up,
洗う:あらう:to wash, 歌う:うたう:to sing, 踊る:おどる:to dance, 考える:かんがえる:to think
形容詞|adjectives
大きい:おおきい:big, 小さい:ちいさい:small, 高い:たかい:tall, 低い:ひくい:low, 長い:ながい:long, 短い:みじかい:short,
新しい:あたらしい:new, 古い:ふるい:old, 暑い:あつい:hot, 寒い:さむい:cold, 暖かい:あたたかい:warm, 涼しい:すずしい:cool,
明るい:あかるい:bright, 暗い:くらい:dark, 速い:はやい:fast, 遅い:おそい:slow, 重い:おもい:heavy, 軽い:かるい:light,
甘い:あまい:sweet, 辛い:からい:spicy, 優しい:やさしい:kind, 静か:しずか:quiet, 賑やか:にぎやか:lively, 綺麗:きれい:beautiful
家族|family
父:ちち:father, 母:はは:mother, 兄:あに:older brother, 姉:あね:older sister, 弟:おとうと:younger brother,
妹:いもうと:younger sister, 祖父:そふ:grandfather, 祖母:そぼ:grandmother, 息子:むすこ:son, 娘:むすめ:daughter,
夫:おっと:husband, 妻:つま:wife, 叔父:おじ:uncle, 叔母:おば:aunt, 従兄弟:いとこ:cousin, 孫:まご:grandchild
教科|school subjects
国語:こくご:Japanese language, 算数:さんすう:arithmetic, 数学:すうがく:mathematics, 理科:りか:science, 社会:しゃかい:social studies,
歴史:れきし:history, 地理:ちり:geography, 音楽:おんがく:music, 美術:びじゅつ:art, 体育:たいいく:physical education,
英語:えいご:English, 家庭科:かていか:home economics, 物理:ぶつり:physics, 化学:かがく:chemistry, 生物:せいぶつ:biology
年中行事|yearly events
正月:しょうがつ:New Year, 節分:せつぶん:the bean-throwing festival, 雛祭り:ひなまつり:the doll festival,
花見:はなみ:cherry blossom viewing, 七夕:たなばた:the star festival, 盆:ぼん:the summer festival of the dead,
月見:つきみ:moon viewing, 大晦日:おおみそか:New Year's Eve, 運動会:うんどうかい:sports day, 文化祭:ぶんかさい:school festival
計算機の言葉|computer terms
計算機:けいさんき:computer, 画面:がめん:screen, 文字列:もじれつ:string, 変数:へんすう:variable, 関数:かんすう:function,
配列:はいれつ:array, 整数:せいすう:integer, 小数:しょうすう:decimal, 条件分岐:じょうけんぶんき:conditional branch,
繰り返し:くりかえし:loop, 引数:ひきすう:argument, 戻り値:もどりち:return value, 記憶装置:きおくそうち:storage device,
演算子:えんざんし:operator, 例外:れいがい:exception, 並列処理:へいれつしょり:parallel processing, 行列:ぎょうれつ:matrix,
確率:かくりつ:probability, 学習率:がくしゅうりつ:learning rate, 損失:そんしつ:loss
時を表す言葉|words for time
今日:きょう:today, 明日:あした:tomorrow, 昨日:きのう:yesterday, 今朝:けさ:this morning, 今晩:こんばん:this evening,
毎日:まいにち:every day, 毎週:まいしゅう:every week, 来月:らいげつ:next month, 去年:きょねん:last year, 午前:ごぜん:morning,
午後:ごご:afternoon, 夜中:よなか:midnight, 週末:しゅうまつ:weekend, 季節:きせつ:season
気持ち|feelings
嬉しい:うれしい:happy, 悲しい:かなしい:sad, 楽しい:たのしい:fun, 寂しい:さびしい:lonely, 怖い:こわい:scary,
恥ずかしい:はずかしい:embarrassed, 懐かしい:なつかしい:nostalgic, 悔しい:くやしい:frustrated, 眠い:ねむい:sleepy,
退屈:たいくつ:bored, 安心:あんしん:relieved, 心配:しんぱい:worried
武道と運動|sports and martial arts
野球:やきゅう:baseball, 相撲:すもう:sumo wrestling, 柔道:じゅうどう:judo, 剣道:けんどう:kendo, 水泳:すいえい:swimming,
卓球:たっきゅう:table tennis, 体操:たいそう:gymnastics, 空手:からて:karate, 弓道:きゅうどう:Japanese archery,
登山:とざん:mountain climbing, 将棋:しょうぎ:Japanese chess, 囲碁:いご:the game of go
外来語|loanwords
コンピューター:コンピューター:computer, テレビ:テレビ:television, カメラ:カメラ:camera, ピアノ:ピアノ:piano,
ギター:ギター:guitar, バス:バス:bus, タクシー:タクシー:taxi, ホテル:ホテル:hotel, レストラン:レストラン:restaurant,
コーヒー:コーヒー:coffee, ケーキ:ケーキ:cake, サンドイッチ:サンドイッチ:sandwich, スプーン:スプーン:spoon,
フォーク:フォーク:fork, ボール:ボール:ball, シャツ:シャツ:shirt, スカート:スカート:skirt, ベッド:ベッド:bed, ドア:ドア:door,
テーブル:テーブル:table, カレンダー:カレンダー:calendar, エレベーター:エレベーター:elevator,
インターネット:インターネット:internet, メール:メール:email, キーボード:キーボード:keyboard, データ:データ:data,
プログラム:プログラム:program, ファイル:ファイル:file, サーバー:サーバー:server, ネットワーク:ネットワーク:network,
ソフトウェア:ソフトウェア:software, アルゴリズム:アルゴリズム:algorithm
"""


def _parse_glossary(text: str) -> list[tuple[str, str, list[tuple[str, str, str]]]]:
    groups = []
    for block in text.strip().split("\n"):
        if "|" in block:
            ja, en = block.split("|")
            groups.append((ja, en, []))
        else:
            for entry in block.split(","):
                if entry.strip():
                    word, reading, english = entry.strip().split(":")
                    groups[-1][2].append((word, reading, english))
    return groups


GLOSSARY = _parse_glossary(GLOSSARY_TEXT)


# --------------------------------------------------------------------------------------------------
# Generators: each takes a Random and returns (text, lang)
# --------------------------------------------------------------------------------------------------


def _date(rng: random.Random) -> datetime.date:
    return datetime.date(2020, 1, 1) + datetime.timedelta(days=rng.randrange(365 * 6))


def _yen(n: int) -> str:
    return f"{n:,}"


def weather_ja(rng):
    d = _date(rng)
    parts = []
    for city, _, offset in rng.sample(CITIES, rng.randint(2, 4)):
        hi = MONTH_HIGH[d.month - 1] + offset + rng.randint(-3, 3)
        lo = MONTH_LOW[d.month - 1] + offset + rng.randint(-3, 2)
        name, _, pops, wet = SNOW if hi <= 4 and rng.random() < 0.6 else rng.choice(WEATHER)
        pop = 10 * rng.randint(*pops)
        s = f"{city}は{name}でしょう。最高気温は{hi}度、最低気温は{lo}度の予想です。降水確率は{pop}パーセントです。"
        if name == "雪":
            s += "路面の凍結に注意してください。"
        elif wet:
            s += "お出かけの際は傘をお持ちください。"
        elif hi >= 30:
            s += "熱中症に気をつけて、こまめに水分をとりましょう。"
        elif hi <= 8:
            s += "暖かくしてお過ごしください。"
        parts.append(s)
    head = f"{d.month}月{d.day}日（{WEEKDAYS_JA[d.weekday()]}）の天気予報です。"
    return head + "".join(parts), "ja"


def weather_en(rng):
    d = _date(rng)
    parts = []
    for _, city, offset in rng.sample(CITIES, rng.randint(2, 4)):
        hi = MONTH_HIGH[d.month - 1] + offset + rng.randint(-3, 3)
        lo = MONTH_LOW[d.month - 1] + offset + rng.randint(-3, 2)
        _, name, pops, wet = SNOW if hi <= 4 and rng.random() < 0.6 else rng.choice(WEATHER)
        pop = 10 * rng.randint(*pops)
        s = f"{city} will be {name}, with a high of {hi} and a low of {lo} degrees. The chance of rain is {pop} percent."
        if name == "snowy":
            s += " Watch out for icy roads."
        elif wet:
            s += " Take an umbrella if you go out."
        elif hi >= 30:
            s += " Drink plenty of water to avoid heatstroke."
        elif hi <= 8:
            s += " Dress warmly."
        parts.append(s)
    head = f"Here is the weather forecast for {WEEKDAYS_EN[d.weekday()]}, {MONTHS_EN[d.month - 1]} {d.day}. "
    return head + " ".join(parts), "en"


def diary_ja(rng):
    d = _date(rng)
    act, details, _, _ = rng.choice(DIARY)
    weather = rng.choice(WEATHER)[0]
    text = (f"{d.year}年{d.month}月{d.day}日（{WEEKDAYS_JA[d.weekday()]}）{weather}\n"
            f"今日は{act}。{rng.choice(details)}。{rng.choice(FEELINGS_JA)}。")
    return text, "ja"


def diary_en(rng):
    d = _date(rng)
    _, _, act, details = rng.choice(DIARY)
    weather = rng.choice(WEATHER)[1]
    text = (f"{WEEKDAYS_EN[d.weekday()]}, {MONTHS_EN[d.month - 1]} {d.day}, {d.year}. It was {weather}.\n"
            f"Today {act}. {rng.choice(details)}. {rng.choice(FEELINGS_EN)}")
    return text, "en"


def receipt_ja(rng):
    lines = ["お買い上げ明細"]
    total = 0
    for name, price, _, _ in rng.sample(ITEMS, rng.randint(2, 5)):
        n = rng.randint(1, 4)
        lines.append(f"{name}　{n}点 × {price}円 = {_yen(n * price)}円")
        total += n * price
    tax = total // 10
    lines += [f"小計　{_yen(total)}円", f"消費税（10%）　{_yen(tax)}円", f"合計　{_yen(total + tax)}円"]
    return "\n".join(lines), "ja"


def receipt_en(rng):
    lines = ["Receipt"]
    total = 0
    for _, _, name, cents in rng.sample(ITEMS, rng.randint(2, 5)):
        n = rng.randint(1, 4)
        lines.append(f"{name}: {n} x ${cents / 100:.2f} = ${n * cents / 100:.2f}")
        total += n * cents
    tax = total * 8 // 100
    lines += [f"Subtotal: ${total / 100:.2f}", f"Tax (8%): ${tax / 100:.2f}", f"Total: ${(total + tax) / 100:.2f}"]
    return "\n".join(lines), "en"


def word_problem_ja(rng):
    name = rng.choice(NAMES_JA)
    kind = rng.randrange(4)
    if kind == 0:
        a, b = rng.randint(2, 30), rng.randint(2, 30)
        q = f"{name}さんはあめを{a}個持っています。お姉さんから{b}個もらいました。あめは全部で何個になりましたか。"
        ans = f"式　{a} + {b} = {a + b}　答え　{a + b}個"
    elif kind == 1:
        a = rng.randint(10, 60)
        b = rng.randint(1, a - 1)
        q = f"{name}さんは色紙を{a}枚持っています。工作で{b}枚使いました。色紙は何枚残っていますか。"
        ans = f"式　{a} - {b} = {a - b}　答え　{a - b}枚"
    elif kind == 2:
        a, b = rng.randint(2, 12), rng.randint(2, 9)
        q = f"1ふくろにみかんが{a}個ずつ入っています。{b}ふくろでは、みかんは全部で何個ですか。"
        ans = f"式　{a} × {b} = {a * b}　答え　{a * b}個"
    else:
        b, c = rng.randint(2, 9), rng.randint(2, 12)
        r = rng.randint(0, b - 1)
        a = b * c + r
        q = f"えんぴつが{a}本あります。{b}人で同じ数ずつ分けると、1人何本になって、何本あまりますか。"
        ans = f"式　{a} ÷ {b} = {c} あまり {r}　答え　1人{c}本で、{r}本あまる"
    return f"問題　{q}\n{ans}", "ja"


def word_problem_en(rng):
    name = rng.choice(NAMES_EN)
    kind = rng.randrange(4)
    if kind == 0:
        a, b = rng.randint(2, 30), rng.randint(2, 30)
        q = f"{name} has {a} marbles and finds {b} more. How many marbles does {name} have now?"
        ans = f"{a} + {b} = {a + b}. {name} has {a + b} marbles."
    elif kind == 1:
        a = rng.randint(10, 60)
        b = rng.randint(1, a - 1)
        q = f"There are {a} cookies in a jar. {name} eats {b} of them. How many cookies are left?"
        ans = f"{a} - {b} = {a - b}. There are {a - b} cookies left."
    elif kind == 2:
        a, b = rng.randint(2, 12), rng.randint(2, 9)
        q = f"Each box holds {a} pencils. How many pencils are there in {b} boxes?"
        ans = f"{a} x {b} = {a * b}. There are {a * b} pencils."
    else:
        b, c = rng.randint(2, 9), rng.randint(2, 12)
        r = rng.randint(0, b - 1)
        a = b * c + r
        q = f"{name} shares {a} stickers equally among {b} friends. How many does each friend get, and how many are left over?"
        ans = f"{a} / {b} = {c} remainder {r}. Each friend gets {c}, and {r} are left over."
    return f"Question: {q}\nAnswer: {ans}", "en"


def times_table(rng):
    n = rng.randint(2, 19)
    if rng.random() < 0.5:
        return f"{n}の段\n" + "\n".join(f"{n} × {i} = {n * i}" for i in range(1, 10)), "ja"
    return f"The {n} times table\n" + "\n".join(f"{n} x {i} = {n * i}" for i in range(1, 13)), "en"


def conversions(rng):
    ja = rng.random() < 0.5
    lines = []
    for a, b, ea, eb, f in rng.sample(CONVERSIONS, 4):
        n = rng.randint(1, 50)
        lines.append(f"{n}{a}は{n * f:,}{b}です。" if ja else f"{n} {ea} is {n * f:,} {eb}.")
    return "\n".join(lines), "ja" if ja else "en"


def calendar(rng):
    ja = rng.random() < 0.5
    lines = []
    for _ in range(5):
        d = _date(rng)
        if ja:
            lines.append(f"{d.year}年{d.month}月{d.day}日は{WEEKDAYS_JA[d.weekday()]}曜日です。")
        else:
            lines.append(f"{MONTHS_EN[d.month - 1]} {d.day}, {d.year} is a {WEEKDAYS_EN[d.weekday()]}.")
    return "\n".join(lines), "ja" if ja else "en"


def timetable(rng):
    ja = rng.random() < 0.5
    i, j = sorted(rng.sample(range(len(LINE)), 2))
    start = rng.randrange(6 * 60, 21 * 60, 5)
    lines = []
    train = f"{rng.choice(TRAIN_NAMES)}{rng.randint(1, 99)}号" if ja else f"Express {rng.randint(100, 999)}"
    for name_ja, name_en, minutes in LINE[i : j + 1]:
        t = start + minutes - LINE[i][2]
        if ja:
            lines.append(f"{name_ja}　{t // 60}時{t % 60:02d}分")
        else:
            lines.append(f"{name_en} {t // 60:02d}:{t % 60:02d}")
    dur = LINE[j][2] - LINE[i][2]
    if ja:
        head = f"{train}は{LINE[i][0]}を{start // 60}時{start % 60:02d}分に出発し、{LINE[j][0]}まで{dur}分で走ります。"
    else:
        head = f"{train} leaves {LINE[i][1]} at {start // 60:02d}:{start % 60:02d} and reaches {LINE[j][1]} in {dur} minutes."
    return head + "\n" + "\n".join(lines), "ja" if ja else "en"


def prefecture_ja(rng):
    lines = []
    for pref, kind, region, capital, _, _ in rng.sample(PREFECTURES, rng.randint(1, 3)):
        office = {"都": "都庁", "道": "道庁", "府": "府庁", "県": "県庁"}[kind]
        if rng.random() < 0.5:
            lines.append(f"{pref}は{region}にあります。{office}所在地は{capital}です。")
        else:
            lines.append(f"問題　{pref}の{office}所在地はどこですか。\n答え　{capital}です。")
    return "\n".join(lines), "ja"


def prefecture_en(rng):
    lines = []
    for _, _, region, _, pref, capital in rng.sample(PREFECTURES, rng.randint(1, 3)):
        if rng.random() < 0.5:
            lines.append(f"{pref} Prefecture is in {REGIONS_EN[region]}. Its capital is {capital}.")
        else:
            lines.append(f"Question: What is the capital of {pref} Prefecture?\nAnswer: The capital is {capital}.")
    return "\n".join(lines), "en"


def recipe(rng):
    ja = rng.random() < 0.5
    name, base, ingredients, steps = rng.choice(RECIPES_JA if ja else RECIPES_EN)
    servings = rng.randint(1, 6)
    lines = [f"{name}（{servings}人分）" if ja else f"{name.capitalize()} (serves {servings})"]
    lines.append("材料" if ja else "Ingredients")
    for item, qty, unit in ingredients:
        q = qty * servings / base
        q = int(q) if q == int(q) else round(q, 1)
        if ja:
            lines.append(f"・{item}　{q}{unit}")
        else:
            lines.append(f"- {q} {unit} {item}" if unit else f"- {q} {item}{'s' if q != 1 else ''}")
    lines.append("作り方" if ja else "Method")
    lines += [f"{k}. {s}" for k, s in enumerate(steps, start=1)]
    return "\n".join(lines), "ja" if ja else "en"


def translation(rng):
    pairs = rng.sample(PAIRS, rng.randint(2, 4))
    if rng.random() < 0.5:
        return "\n".join(f"英語: {en}\n日本語: {ja}" for en, ja in pairs), "ja"
    return "\n".join(f"Japanese: {ja}\nEnglish: {en}" for en, ja in pairs), "en"


def countries(rng):
    ja = rng.random() < 0.5
    lines = []
    for cj, kj, ce, ke in rng.sample(COUNTRIES, rng.randint(2, 4)):
        if ja:
            lines.append(rng.choice([f"{cj}の首都は{kj}です。", f"問題　{cj}の首都はどこですか。\n答え　{kj}です。"]))
        else:
            lines.append(rng.choice([f"The capital of {ce} is {ke}.", f"Question: What is the capital of {ce}?\nAnswer: {ke}."]))
    return "\n".join(lines), "ja" if ja else "en"


def irregular_verbs(rng):
    ja = rng.random() < 0.4
    lines = ["英語の不規則動詞" if ja else "English irregular verbs"]
    for base, past, part, meaning in rng.sample(IRREGULAR_VERBS, rng.randint(3, 6)):
        if ja:
            lines.append(f"{base}（{meaning}）の過去形は {past}、過去分詞は {part} です。")
        else:
            lines.append(rng.choice([f"The past tense of {base} is {past}, and the past participle is {part}.",
                                     f"{base} - {past} - {part}"]))
    return "\n".join(lines), "ja" if ja else "en"


def glossary_ja(rng):
    cat, _, entries = rng.choice(GLOSSARY)
    lines = [f"{cat}の名前"]
    for word, reading, english in rng.sample(entries, min(len(entries), rng.randint(3, 6))):
        form = rng.randrange(3)
        if word == reading:
            lines.append(f"「{word}」は外来語です。英語では {english} といいます。")
        elif form == 0:
            lines.append(f"「{word}」は「{reading}」と読みます。英語では {english} といいます。")
        elif form == 1:
            lines.append(f"{word}（{reading}）は{cat}の一つです。")
        else:
            lines.append(f"英語の {english} は、日本語で「{word}」（{reading}）です。")
    return "\n".join(lines), "ja"


def glossary_en(rng):
    _, cat, entries = rng.choice(GLOSSARY)
    lines = [f"Japanese words: {cat}"]
    for word, reading, english in rng.sample(entries, min(len(entries), rng.randint(3, 6))):
        if word == reading or rng.random() < 0.5:
            lines.append(f"The Japanese word for {english} is {word}.")
        else:
            lines.append(f"{word}, read {reading}, means {english}.")
    return "\n".join(lines), "en"


def code_area(rng):
    name, params, formula, doc_ja, doc_en = rng.choice(SHAPES)
    values = [rng.randint(1, 20) for _ in params]
    env = dict(zip(params, values))
    result = eval(formula, {}, env)  # formulas are the fixed strings above
    doc = doc_ja if rng.random() < 0.5 else doc_en
    args = ", ".join(f"{p}: float" for p in params)
    call = ", ".join(str(v) for v in values)
    text = (f"def area_of_{name}({args}) -> float:\n    \"\"\"{doc}\"\"\"\n    return {formula}\n\n\n"
            f"print(area_of_{name}({call}))  # {result}\n")
    return text, "code"


def code_convert(rng):
    a, b, ea, eb, f = rng.choice(CONVERSIONS)
    n = rng.randint(1, 30)
    doc = f"{a}を{b}に変換する。" if rng.random() < 0.5 else f"Convert {ea} to {eb}."
    fn = f"{ea}_to_{eb}"
    text = (f"def {fn}(value: float) -> float:\n    \"\"\"{doc}\"\"\"\n    return value * {f}\n\n\n"
            f"assert {fn}({n}) == {n * f}\n")
    return text, "code"


def code_loop(rng):
    a = rng.randint(0, 20)
    b = a + rng.randint(5, 60)
    step = rng.randint(1, 5)
    values = list(range(a, b, step))
    var = rng.choice(["total", "acc", "s", "result"])
    if rng.random() < 0.5:
        text = (f"{var} = 0\nfor i in range({a}, {b}, {step}):\n    {var} += i\nprint({var})  # {sum(values)}\n")
    else:
        text = (f"let {var} = 0;\nfor (let i = {a}; i < {b}; i += {step}) {{\n  {var} += i;\n}}\n"
                f"console.log({var}); // {sum(values)}\n")
    return text, "code"


def code_class(rng):
    cls, ja, en = rng.choice(ANIMALS)
    sound = ja if rng.random() < 0.5 else en
    times = rng.randint(1, 4)
    text = (f"class {cls}:\n    def __init__(self, name: str):\n        self.name = name\n\n"
            f"    def speak(self, times: int = 1) -> str:\n        return \" \".join([\"{sound}\"] * times)\n\n\n"
            f"pet = {cls}(\"{rng.choice(NAMES_EN)}\")\nprint(pet.speak({times}))  # {' '.join([sound] * times)}\n")
    return text, "code"


def code_sql(rng):
    table, cols = rng.choice(TABLES)
    picked = rng.sample(cols, rng.randint(2, len(cols)))
    where = rng.choice(cols)
    n = rng.randint(1, 2000)
    limit = rng.choice([5, 10, 20, 50, 100])
    text = (f"SELECT {', '.join(picked)}\nFROM {table}\nWHERE {where} >= {n}\n"
            f"ORDER BY {picked[0]}\nLIMIT {limit};\n")
    return text, "code"


def code_json(rng):
    pref = rng.choice(PREFECTURES)
    city = rng.choice(CITIES)
    record = {
        "id": rng.randint(1, 99999),
        "prefecture": pref[0],
        "capital": pref[3],
        "city": city[1],
        "temperature": [MONTH_HIGH[m] + city[2] for m in range(0, 12, 3)],
        "active": rng.random() < 0.5,
    }
    return json.dumps(record, ensure_ascii=False, indent=2), "code"


GENERATORS: list[tuple[Callable, float]] = [
    (weather_ja, 3), (weather_en, 2), (diary_ja, 3), (diary_en, 2), (receipt_ja, 1.5), (receipt_en, 1),
    (word_problem_ja, 2.5), (word_problem_en, 2), (times_table, 0.8), (conversions, 1), (calendar, 0.8),
    (timetable, 1), (prefecture_ja, 1.5), (prefecture_en, 1), (recipe, 1), (translation, 1.5), (glossary_ja, 4), (glossary_en, 2.5), (countries, 1), (irregular_verbs, 1.2),
    (code_area, 1.2), (code_convert, 1.2), (code_loop, 1.2), (code_class, 1), (code_sql, 1), (code_json, 0.8),
]


# --------------------------------------------------------------------------------------------------
# The hand-written seed text
# --------------------------------------------------------------------------------------------------


def seed_documents() -> list[tuple[str, str]]:
    """(text, lang) of every hand-written document in ``tanuki/sample_data/seed/``."""
    docs = []
    for lang in ("ja", "en"):
        text = (DATA / "seed" / f"{lang}.txt").read_text(encoding="utf-8")
        docs += [(p.strip(), lang) for p in text.split("\n\n") if p.strip()]
    code = (DATA / "seed" / "code.txt").read_text(encoding="utf-8")
    docs += [(s.strip("\n") + "\n", "code") for s in code.split("\n%%\n") if s.strip()]
    return docs


def _sentences(docs: list[tuple[str, str]], lang: str) -> list[str]:
    out = []
    for text, l in docs:
        if l != lang:
            continue
        if lang == "ja":
            out += [s + "。" for s in text.replace("\n", "").split("。") if s.strip()]
        else:
            out += [s.strip() + "." for s in text.replace("\n", " ").split(". ") if s.strip()]
    return out


def remix(rng: random.Random, sentences: dict[str, list[str]]):
    """A paragraph of hand-written sentences in random order (benchmark corpora only)."""
    lang = "ja" if rng.random() < 0.55 else "en"
    picked = rng.sample(sentences[lang], rng.randint(3, 8))
    return ("" if lang == "ja" else " ").join(s.rstrip(".") + "." if lang == "en" else s for s in picked), lang


# Benchmark corpora need the vocabulary of a real corpus, far beyond the word banks above: a Zipfian
# lexicon of made-up words (kanji compounds, katakana words, English-like syllable words) fills
# ordinary sentence frames. The text is not meant to be read, only to have real-sized statistics.
_JA_PARTICLE_FRAMES = [
    "{0}は{1}の{2}を{v}。", "{0}と{1}が{2}について{v}。", "{0}で{1}を{v}のは{2}です。", "{0}の{1}は{n}{c}の{2}です。",
    "{0}によると、{1}の{2}は{n}{c}増えました。", "{0}から{1}まで{2}で{n}分かかります。",
]
_JA_VERBS = ["見ました", "作りました", "使いました", "調べました", "書きました", "読みました", "買いました", "運びました",
             "選びました", "届けました", "話し合いました", "集めました", "確かめました", "始めました", "続けました"]
_JA_COUNTERS = ["個", "本", "枚", "人", "台", "冊", "回", "件", "年", "か月", "キロ", "パーセント"]
_EN_FRAMES = [
    "The {0} of the {1} {v} the {2}.", "A {0} {v} {n} {1} near the {2}.", "In {n}, the {0} and the {1} {v} a {2}.",
    "Every {0} {v} the {1}, but no {2} did.", "The {0} was {n} times larger than the {1} of the {2}.",
]
_EN_VERBS = ["found", "moved", "opened", "measured", "painted", "followed", "carried", "counted", "visited",
             "described", "repaired", "collected", "changed", "reached", "replaced"]
_ONSETS = ["b", "br", "c", "ch", "cl", "d", "dr", "f", "fl", "g", "gr", "h", "j", "k", "l", "m", "n", "p", "pl",
           "pr", "qu", "r", "s", "sh", "sl", "st", "t", "th", "tr", "v", "w", "y", "z", ""]
_VOWELS = ["a", "e", "i", "o", "u", "ai", "ea", "ou", "oo", "y"]
_CODAS = ["", "", "n", "r", "s", "t", "l", "m", "nd", "st", "ck", "ng", "x"]


class Lexicon:
    """Made-up words with Zipfian frequencies (rank r drawn with weight 1 / r**1.07), seeded."""

    def __init__(self, rng: random.Random, size: int = 40_000):
        kanji = rng.sample([chr(c) for c in range(0x4E00, 0x9FA0)], 2500)
        katakana = [chr(c) for c in range(0x30A2, 0x30F3) if chr(c) not in "ァィゥェォッャュョヮ"] + ["ー"]
        ja, en = set(), set()
        while len(ja) < size:
            if rng.random() < 0.7:
                ja.add("".join(rng.choice(kanji[: rng.choice([300, 1000, 2500])]) for _ in range(rng.randint(2, 3))))
            else:
                ja.add("".join(rng.choice(katakana) for _ in range(rng.randint(3, 6))))
        while len(en) < size:
            en.add("".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS) for _ in range(rng.randint(1, 3))))
        self.ja, self.en = sorted(ja), sorted(en)
        rng.shuffle(self.ja)
        rng.shuffle(self.en)
        weights = [1 / (r + 1) ** 1.07 for r in range(size)]
        self.cum = list(itertools.accumulate(weights))

    def words(self, rng: random.Random, lang: str, k: int) -> list[str]:
        return rng.choices(self.ja if lang == "ja" else self.en, cum_weights=self.cum, k=k)


def synthetic(rng: random.Random, lex: Lexicon):
    """A paragraph of sentence frames filled from the lexicon (benchmark corpora only)."""
    r = rng.random()
    if r < 0.5:
        sents = []
        for _ in range(rng.randint(3, 8)):
            frame = rng.choice(_JA_PARTICLE_FRAMES)
            sents.append(frame.format(*lex.words(rng, "ja", 3), v=rng.choice(_JA_VERBS), n=rng.randint(1, 999),
                                      c=rng.choice(_JA_COUNTERS)))
        return "".join(sents), "ja"
    if r < 0.85:
        sents = []
        for _ in range(rng.randint(3, 8)):
            frame = rng.choice(_EN_FRAMES)
            sents.append(frame.format(*lex.words(rng, "en", 3), v=rng.choice(_EN_VERBS), n=rng.randint(2, 2000)))
        return " ".join(s[0].upper() + s[1:] for s in sents), "en"
    a, b, c, d = lex.words(rng, "en", 4)
    n = rng.randint(2, 99)
    text = (f"def {a}_{b}({c}, {d}={n}):\n    \"\"\"Return the {b} of {c}.\"\"\"\n    {a} = {c} * {d}\n"
            f"    if {a} > {n * 10}:\n        return {a} - {n}\n    return {a}\n")
    return text, "code"


def generate(target_bytes: int, seed: int) -> Iterator[dict]:
    """Documents until about ``target_bytes`` of JSONL: the seed text first, then templates.

    Up to :data:`SAMPLE_BYTES`, template documents. Past it (benchmark corpora): 20% remixed
    hand-written sentences, 50% sentence frames filled from a made-up Zipfian lexicon (so that the
    vocabulary grows like a real corpus's), 30% template documents.
    """
    rng = random.Random(seed)
    seeds = seed_documents()
    written = 0
    docs = []
    for text, lang in seeds:
        docs.append({"text": text, "lang": lang})
    gens, weights = zip(*GENERATORS)
    sentences = {lang: _sentences(seeds, lang) for lang in ("ja", "en")}
    written = sum(len(json.dumps(d, ensure_ascii=False).encode("utf-8")) + 1 for d in docs)
    while written < min(target_bytes, SAMPLE_BYTES):
        text, lang = rng.choices(gens, weights)[0](rng)
        docs.append({"text": text, "lang": lang})
        written += len(json.dumps(docs[-1], ensure_ascii=False).encode("utf-8")) + 1
    rng.shuffle(docs)
    yield from docs
    lexicon = Lexicon(random.Random(seed + 1)) if written < target_bytes else None
    while written < target_bytes:
        r = rng.random()
        if r < 0.2:
            text, lang = remix(rng, sentences)
        elif r < 0.7:
            text, lang = synthetic(rng, lexicon)
        else:
            text, lang = rng.choices(gens, weights)[0](rng)
        doc = {"text": text, "lang": lang}
        written += len(json.dumps(doc, ensure_ascii=False).encode("utf-8")) + 1
        yield doc


def write_corpus(path: str | os.PathLike, target_bytes: int = SAMPLE_BYTES, seed: int = SAMPLE_SEED) -> int:
    """Write the corpus to ``path``; returns the number of documents."""
    n = 0
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for doc in generate(target_bytes, seed):
            f.write(json.dumps(doc, ensure_ascii=False) + "\n")
            n += 1
    return n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(DATA / "corpus.jsonl"), help="output JSONL path")
    parser.add_argument("--size-mb", type=float, default=SAMPLE_BYTES / 1e6, help="approximate size in MB")
    parser.add_argument("--seed", type=int, default=SAMPLE_SEED)
    args = parser.parse_args()
    n = write_corpus(args.out, int(args.size_mb * 1e6), args.seed)
    print(f"wrote {n} documents to {args.out}")


if __name__ == "__main__":
    main()
